"""The transformers engine's shared-prefix prefill and grouped attention: faster, never different.

Seeded sampled texts must not depend on layout (batch size, prefill chunking,
how requests arrive in shards) nor on whether a shared prefix was prefilled
once; greedy tokens must equal `generate`'s."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_model import save_tiny_model
from workers.attention import NAME, use_grouped_attention
from workers.engine import Request, SamplingParams, generate
from workers.transformers_engine import TransformersEngine

MAX_NEW = 12


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    """(model, tokenizer) with room for a 128-token prefix; one torch thread (a shared machine)."""
    path = save_tiny_model(tmp_path_factory.mktemp("prefix") / request.param, arch=request.param, max_positions=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(threads)


def template_requests(lm, prefix_len: int, rows: int = 10, seed: int = 0) -> list[Request]:
    """`rows` prompts: two templates of `prefix_len` tokens, each followed by a suffix of its own (1-20 tokens)."""
    vocab = lm[0].config.vocab_size
    rng = random.Random(prefix_len)
    templates = [tuple(rng.randrange(3, vocab) for _ in range(prefix_len)) for _ in range(2)]
    reqs = []
    for k in range(rows):
        suffix = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, 20)))
        reqs.append(Request(k, templates[k % 2] + suffix, seed + k, MAX_NEW - k % 4))
    return reqs


def run(lm, reqs, shards: int = 1, batch_size: int = 8, pad_limit: float | None = None, share: bool = True, **params):
    """Completions in request order; `shards`: how many submits the requests arrive in."""
    model, tokenizer = lm
    engine = TransformersEngine(model, tokenizer, SamplingParams(max_new_tokens=MAX_NEW, **params), batch_size, 100_000)
    engine.prefix_share = share
    if pad_limit is not None:
        engine.prefill_pad_limit = pad_limit
    size = -(-len(reqs) // shards)
    for at in range(0, len(reqs), size):
        engine.submit(reqs[at : at + size])
    done = {}
    while engine.has_work():
        done.update((c.key, c) for c in engine.step())
    return [(done[r.key].token_ids, done[r.key].text) for r in reqs], engine.counters


def test_a_shared_prefix_is_prefilled_once_per_chunk(lm):
    reqs = [r for r in template_requests(lm, 128) if r.key % 2 == 0]  # one template: 5 rows
    shared, counters = run(lm, reqs)
    assert counters["prefix_shared_tokens"] == 4 * 128  # one chunk of 5 rows: 4 prefixes not computed
    plain, plain_counters = run(lm, reqs, share=False)
    assert plain_counters["prefix_shared_tokens"] == 0
    assert plain_counters["forward_tokens"] - counters["forward_tokens"] == 4 * 128
    assert shared == plain


def test_short_or_unshared_prompts_prefill_as_before(lm):
    reqs = template_requests(lm, 40)  # under MIN_SHARED_PREFIX
    assert run(lm, reqs)[1]["prefix_shared_tokens"] == 0


@pytest.mark.parametrize("prefix_len", [64, 128])
def test_greedy_with_a_shared_prefix_equals_generate(lm, prefix_len):
    model, _ = lm
    reqs = template_requests(lm, prefix_len)
    out, counters = run(lm, reqs, batch_size=4)
    assert counters["prefix_shared_tokens"] > 0
    eos = model.generation_config.eos_token_id
    for r, (tokens, _) in zip(reqs, out):
        ids = torch.tensor([r.prompt_ids])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=r.max_new_tokens, pad_token_id=0
        )
        ref = ref[0, len(r.prompt_ids) :].tolist()
        assert list(tokens) == (ref[: ref.index(eos)] if eos in ref else ref)


@pytest.mark.parametrize("prefix_len", [64, 128])
def test_seeded_sampled_texts_are_identical_across_layouts_and_with_prefix_sharing_on_and_off(lm, prefix_len):
    reqs = template_requests(lm, prefix_len, rows=12, seed=prefix_len)
    params = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=40)
    reference, counters = run(lm, reqs, **params)
    assert counters["prefix_shared_tokens"] > 0
    assert len({tokens for tokens, _ in reference}) > 6  # the samples differ from row to row
    layouts = [
        dict(share=False),
        dict(batch_size=1),
        dict(batch_size=3, shards=4),
        dict(batch_size=5, shards=3, share=False),
        dict(pad_limit=0.0, shards=2),  # every prefill chunk of equal lengths only
        dict(pad_limit=1.0, batch_size=12),  # one chunk for all
    ]
    for layout in layouts:
        assert run(lm, reqs, **layout, **params)[0] == reference, layout


def test_rows_of_different_adapters_never_share_a_prefix(lm):
    model, tokenizer = lm
    reqs = [r.__class__(r.key, r.prompt_ids, r.seed, r.max_new_tokens, adapter="a" if r.key % 4 else None)
            for r in template_requests(lm, 64) if r.key % 2 == 0]  # fmt: skip
    engine = TransformersEngine(model, tokenizer, SamplingParams(max_new_tokens=MAX_NEW), 8, 100_000)
    assert engine._shared_prefix(reqs) == 0
    assert engine._shared_prefix([r for r in reqs if r.adapter == "a"]) == 64


def test_grouped_attention_gives_the_bits_of_sdpa(tmp_path):
    path = save_tiny_model(tmp_path / "llama", max_positions=256)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    grouped = AutoModelForCausalLM.from_pretrained(path).eval()
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # grouped heads
    assert use_grouped_attention(grouped) and grouped.config._attn_implementation == NAME
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(3, plain.config.vocab_size, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :25], mask[1, :7] = 0, 0  # left padding: the masked path that repeat_kv copied for
    with torch.inference_mode():
        assert torch.equal(plain(ids, attention_mask=mask).logits, grouped(ids, attention_mask=mask).logits)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reqs = [Request(k, tuple(ids[k, int((mask[k] == 0).sum()) :].tolist()), k, 10 + k) for k in range(3)]
    params = SamplingParams(max_new_tokens=16)
    out = generate(TransformersEngine(grouped, tokenizer, params, 2, 100_000), reqs)
    ref = generate(TransformersEngine(plain, tokenizer, params, 2, 100_000), reqs)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
