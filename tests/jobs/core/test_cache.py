"""The row cache's contract (jobs/core/cache.py): what decides a key, and what an entry is."""

from __future__ import annotations

import pytest

from jobs.core.cache import Entry, checkpoint_identity, context_digest, sequence_key, tokenizer_identity

MODEL = {"path": "m", "revision": None, "weights_sha256": "aa", "commit_hash": None, "dtype": "float32"}
TOKENIZER = {"path": "m", "revision": None, "files_sha256": "bb"}
ENGINE = {"engine": "transformers", "engine_version": "5.19.0", "device": "cpu"}
GENERATION = {
    "max_new_tokens": 8, "do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "stop": [], "seed": 1, "num_return_sequences": 2,
}  # fmt: skip


def key(model=MODEL, tokenizer=TOKENIZER, engine=ENGINE, generation=GENERATION, prompt=(1, 2, 3), seed=7, sample=0,
        limit=8) -> str:  # fmt: skip
    return sequence_key(context_digest(model, tokenizer, engine, generation), prompt, seed, sample, limit)


def test_the_same_sequence_has_the_same_key():
    assert key() == key(generation=dict(GENERATION))
    # Fields that decide no text of their own (the seed and limit enter per sequence).
    assert key() == key(generation={**GENERATION, "seed": 99, "num_return_sequences": 4, "max_new_tokens": 64})


@pytest.mark.parametrize(
    "changed",
    [
        {"prompt": (1, 2, 4)},
        {"seed": 8},
        {"sample": 1},
        {"limit": 9},
        {"model": {**MODEL, "weights_sha256": "ab"}},
        {"model": {**MODEL, "revision": "v2"}},
        {"model": {**MODEL, "commit_hash": "c0ffee"}},
        {"model": {**MODEL, "dtype": "bfloat16"}},
        {"tokenizer": {**TOKENIZER, "files_sha256": "bc"}},
        {"engine": {**ENGINE, "engine": "vllm"}},
        {"engine": {**ENGINE, "engine_version": "5.20.0"}},
        {"engine": {**ENGINE, "device": "cuda"}},
        *({"generation": {**GENERATION, field: value}} for field, value in [
            ("temperature", 0.7), ("top_p", 0.9), ("top_k", 5), ("repetition_penalty", 1.1),
            ("no_repeat_ngram_size", 3), ("stop", ["\n"]), ("do_sample", False),
        ]),
    ],
)  # fmt: skip
def test_anything_that_decides_the_text_changes_the_key(changed):
    assert key(**changed) != key()


def test_a_local_tokenizer_is_known_by_its_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights are the model's, not the tokenizer's")
    before = tokenizer_identity(str(tmp_path), None)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_identity(str(tmp_path), None) == before
    (tmp_path / "tokenizer.json").write_text('{"added": 1}')
    assert tokenizer_identity(str(tmp_path), None) != before


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "modeling_custom.py"])
def test_a_local_checkpoint_is_known_by_its_config_and_code(tmp_path, name):
    (tmp_path / "config.json").write_text('{"rope_theta": 10000.0}')
    (tmp_path / "generation_config.json").write_text('{"temperature": 1.0}')
    (tmp_path / "modeling_custom.py").write_text("# remote code")
    (tmp_path / "README.md").write_text("a model card decides no text")
    before = checkpoint_identity(str(tmp_path))
    (tmp_path / "README.md").write_text("edited")
    assert checkpoint_identity(str(tmp_path)) == before
    (tmp_path / name).write_text((tmp_path / name).read_text() + " ")
    assert checkpoint_identity(str(tmp_path)) != before
    assert checkpoint_identity("org/hub-model") == {}  # a hub name: its resolved commit decides


@pytest.mark.parametrize(
    "stored",
    [
        b'{"text": null, "finish_reason": "stop", "completion_tokens": 1}',
        b'{"finish_reason": "stop", "completion_tokens": 1}',
        b'{"text": "hi", "finish_reason": "banana", "completion_tokens": 1}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": -1}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": "1"}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1.5}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": true}',
        b'{"text": "\\ud800", "finish_reason": "stop", "completion_tokens": 1}',
        b'{"text": "hi", "finish_reason": "st',
        b'["hi", "stop", 1]',
        b"\xff\xfe",
    ],
)
def test_an_entry_not_of_the_row_schema_does_not_parse(stored):
    with pytest.raises(ValueError):
        Entry.from_bytes(stored)


@pytest.mark.parametrize(
    "stored",
    [
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "token_ids": [3, 4]}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "token_ids": [-3]}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "token_logprobs": [0.5]}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "token_logprobs": ["x"]}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "top_logprobs": [[[3]]]}',
        b'{"text": "hi", "finish_reason": "stop", "completion_tokens": 1, "top_logprobs": [[[3, 1.0]]]}',
    ],
)
def test_a_per_token_field_not_of_the_row_schema_does_not_parse(stored):
    with pytest.raises(ValueError):
        Entry.from_bytes(stored)


def test_keys_of_plain_sequences_are_what_they_were():
    """Golden values computed with the code before the request's extras joined the key (141252b):
    a job that asks for none of them keeps every row-cache entry it has."""
    assert sequence_key("ctx", [1, 2, 3], 7, 0, 16) == "e671b867f37b849596f336a2540cdb5e1c05b5b5c32c397b9dd229fced65c749"
    assert sequence_key("ctx", [1, 2, 3], 7, 1, 16, {"temperature": 0.5}, {}) == (
        "ccefa5df55bf4d0e18bc8532dc562e3f3b5b8ce63720b869b41721cb4d3d9cef"
    )
    generation = {"max_new_tokens": 16, "seed": 1, "temperature": 1.0}
    for feature_off in ({}, {"structured": None, "logprobs": False, "top_logprobs": 0, "reasoning": "off"}):
        digest = context_digest({"path": "m"}, {"path": "t"}, {"engine": "transformers"}, {**generation, **feature_off})
        assert digest == "2d6b623ad4a362ed359b86da2614cd5481c6c8b70172172058136a75c20c53f7"
    assert sequence_key("ctx", [1, 2, 3], 7, 0, 16, None, {"adapter": "a"}) != sequence_key("ctx", [1, 2, 3], 7, 0, 16)


def test_an_entry_keeps_its_tokens_and_logprobs():
    top = (((5, -0.5),), ((6, -1.0), (7, -2.0)))
    full = Entry("hi", "stop", 2, token_ids=(5, 6), token_logprobs=(-0.5, -1.0), top_logprobs=top)
    assert Entry.from_bytes(full.to_bytes()) == full
    # An entry written before token ids were kept reads as it was written, and is a miss for a stage needing them.
    old = Entry.from_bytes(b'{"completion_tokens": 2, "finish_reason": "stop", "text": "hi"}')
    assert old == Entry("hi", "stop", 2) and old.to_bytes() == Entry("hi", "stop", 2).to_bytes()
    assert old.fits(2) and not old.fits(2, frozenset({"token_ids"}))
    assert full.fits(2, frozenset({"token_ids", "token_logprobs", "top_logprobs"}))


def test_an_entry_fits_its_sequence_limit():
    entry = Entry.from_bytes(b'{"text": "hi", "finish_reason": "length", "completion_tokens": 8}')
    assert entry == Entry("hi", "length", 8)
    assert entry.fits(8) and not entry.fits(7)
