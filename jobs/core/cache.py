"""The row cache's contract: generated sequences kept under `cache.uri`, shared by every job
that names it. Here: what decides a key, the layout and an entry; the store that reads
and writes entries is the replica's (workers/row_cache_store.py).

A nightly prompt set is mostly last night's. With a cache, a replica looks up
each sequence before generating it and writes the hits to the output as if it
had generated them; only the misses reach the engine. Entries are written
only for committed shards (the driver asks the replica after the commit), so
a killed job leaves no entry for rows it never committed, and exactly-once
holds as without a cache.

Layout, content-addressed and append-only (delete any part of it at any time:
a missing entry is only a miss):

    <cache.uri>/v1/<key[:2]>/<key>.json   {"text", "finish_reason", "completion_tokens",
                                           "token_ids", and where asked "token_logprobs", "top_logprobs"}

The key is a SHA-256 over everything that decides a sequence's text:

- the rendered prompt's token ids and the sequence's own max_new_tokens;
- its sampling seed (row_seed of the job seed, row id and sample index) and sample index;
- the sampling parameters (do_sample, temperature, top_p, top_k, repetition_penalty,
  no_repeat_ngram_size, stop), the job's or a batch request's own;
- what the request asks beyond them (its grammar, its logprobs, its adapter), where it asks;
- the model: path, revision, the weights' SHA-256 (a local checkpoint) or the hub
  commit it resolved to, a hash of a local checkpoint's config.json,
  generation_config.json and code files (rope_theta, a default sampling
  setting or remote code change the text as much as the weights do), and the
  dtype it ran in;
- the tokenizer: its path and revision, and a hash of its files (a local one);
- the engine and its version, and whether the job runs adapters (its base rows then run
  through LoRA layers too).

Two jobs may share a cache at once: an entry is one whole object, and two
writers of one key write the same sequence. An entry is used only if it parses
into the row schema (Entry.from_bytes, Entry.fits); anything else is a miss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = "v1"
# Generation fields that are per sequence (in the key on their own) or decide no text.
# (structured, logprobs and top_logprobs go into each sequence's key, as its request's own; reasoning
# changes no generated token.) So adding one of them keeps every existing job's keys.
_NOT_CONTEXT = ("seed", "max_new_tokens", "num_return_sequences", "structured", "logprobs", "top_logprobs", "reasoning")
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template", "spiece")
# A checkpoint's files besides weights and tokenizer that decide its text: the architecture
# (rope_theta, ...), its default generation settings, and code it ships (trust_remote_code).
_CONFIG_FILES = ("config.json", "generation_config.json")
_CODE_SUFFIX = ".py"
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class Entry:
    text: str
    finish_reason: str  # stop | length
    completion_tokens: int
    # Written when known; an entry written without them (by an older bulkgen) is a miss for
    # a stage that needs them (fits).
    token_ids: tuple[int, ...] | None = None
    token_logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        """The entry in `data`; ValueError saying why when it is not one of the row schema
        (a user's stray file, a truncated write, a hand edit)."""
        doc = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not isinstance(doc, dict):
            raise ValueError(f"an entry is a JSON object, not {type(doc).__name__}")
        text, reason, tokens = doc.get("text"), doc.get("finish_reason"), doc.get("completion_tokens")
        if not isinstance(text, str):
            raise ValueError(f"text is {text!r}, not a string")
        text.encode("utf-8")  # a lone surrogate (JSON "\ud800") could not be written to Parquet
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason is {reason!r}, not one of {FINISH_REASONS}")
        if type(tokens) is not int or tokens < 0:
            raise ValueError(f"completion_tokens is {tokens!r}, not an integer >= 0")
        ids, logprobs, top = doc.get("token_ids"), doc.get("token_logprobs"), doc.get("top_logprobs")
        if ids is not None:
            ids = _per_token("token_ids", ids, tokens, lambda x: type(x) is int and x >= 0)
        if logprobs is not None:
            logprobs = _per_token("token_logprobs", logprobs, tokens, _is_logprob)
        if top is not None:
            top = _per_token("top_logprobs", top, tokens, _is_top_list)
            top = tuple(tuple((t, float(p)) for t, p in step) for step in top)
        return cls(text, reason, tokens, ids, tuple(map(float, logprobs)) if logprobs is not None else None, top)

    def fits(self, max_new_tokens: int, needs: frozenset[str] = frozenset()) -> bool:
        """Whether the sequence this entry stands for could have been generated within its limit,
        and the entry has every field in `needs`."""
        return self.completion_tokens <= max_new_tokens and all(getattr(self, f) is not None for f in needs)


def _per_token(name: str, values, tokens: int, valid) -> tuple:
    if not isinstance(values, list) or len(values) != tokens or not all(valid(v) for v in values):
        raise ValueError(f"{name} is not a list of {tokens} values of its kind (one per completion token)")
    return tuple(values)


def _is_logprob(x) -> bool:
    return type(x) in (int, float) and x <= 0 and math.isfinite(x)


def _is_top_list(step) -> bool:
    return isinstance(step, list) and all(
        isinstance(p, list) and len(p) == 2 and type(p[0]) is int and _is_logprob(p[1]) for p in step
    )


def context_digest(model: dict, tokenizer: dict, engine: dict, generation: dict) -> str:
    """What every sequence of one replica shares: model, tokenizer, engine, sampling parameters."""
    doc = {
        "version": VERSION,
        "model": model,
        "tokenizer": tokenizer,
        "engine": engine,
        "generation": {k: v for k, v in generation.items() if k not in _NOT_CONTEXT},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def sequence_key(
    context: str,
    prompt_ids,
    seed: int,
    sample_index: int,
    max_new_tokens: int,
    params: dict | None = None,
    request: dict | None = None,
) -> str:
    """`params`: the sequence's own sampling parameters, where they differ from the job's (a batch request's);
    `request`: what the request asks beyond them (grammar, logprobs, adapter). Neither is hashed when
    absent, so a plain sequence's key is what it always was."""
    doc = [context, list(prompt_ids), seed, sample_index, max_new_tokens]
    if params is not None:
        doc.append(params)
    if request:
        doc.append({"request": request})  # a params dict never has this one key
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def tokenizer_identity(path: str, revision: str | None) -> dict:
    """The tokenizer's name and revision, and for a local one a hash of its files."""
    identity = {"path": path, "revision": revision}
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for p in sorted(Path(path).iterdir()):
            if p.is_file() and any(part in p.name for part in _TOKENIZER_FILES):
                digest.update(p.name.encode() + b"\0" + p.read_bytes())
        identity["files_sha256"] = digest.hexdigest()
    return identity


def entry_path(key: str) -> str:
    """Where the entry of `key` lives, relative to cache.uri (the layout above)."""
    return f"{VERSION}/{key[:2]}/{key}.json"


def checkpoint_identity(path: str) -> dict:
    """For a local checkpoint, a hash of its config files and shipped code (its weights are
    hashed apart, jobs/preflight.model_identity); empty for a hub name (its commit decides)."""
    if not os.path.isdir(path):
        return {}
    digest = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.is_file() and (p.name in _CONFIG_FILES or p.name.endswith(_CODE_SUFFIX)):
            digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {"config_sha256": digest.hexdigest()}
