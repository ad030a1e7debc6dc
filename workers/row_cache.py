"""A replica's side of the row cache (jobs/core/cache.py): look sequences up
before generating them, and write the generated ones only after the driver has
committed their shard (it calls Replica.publish_cache with the attempt)."""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

from jobs.core import structured
from jobs.core.cache import Entry, checkpoint_identity, context_digest, sequence_key, tokenizer_identity
from jobs.core.spec import JobSpec
from workers.engine import Request
from workers.row_cache_store import RowCache

log = logging.getLogger(__name__)


def _params(r: Request) -> dict | None:
    params = r.params  # a batch request's own sampling parameters
    return dataclasses.asdict(params) if params is not None else None


def _request_extra(r: Request, adapter_sha256: dict[str, str], whitespace: str) -> dict:
    """What a request asks beyond its sampling parameters, for its key (empty: nothing).
    `adapter_sha256`: the job's adapters' hashes, by name; `whitespace`: the job's JSON whitespace
    (generation.structured.whitespace), which shapes a grammar."""
    extra = {}
    if r.structured is not None:
        extra["structured"] = [r.structured.kind, r.structured.value, whitespace]
    if r.logprobs is not None:
        extra["logprobs"] = r.logprobs
    if r.adapter is not None:
        extra["adapter"] = adapter_sha256[r.adapter]  # its files, not its name: a retrained adapter misses
    return extra


def _needs(r: Request) -> frozenset[str]:
    """What an entry must hold for this request, beyond what the stages need."""
    if r.logprobs is None:
        return frozenset()
    return frozenset({"token_logprobs", "top_logprobs"} if r.logprobs else {"token_logprobs"})


HELD_ATTEMPTS = 64  # attempts whose commit may still come; older ones were never committed
MODEL_IDENTITY = ("path", "revision", "weights_sha256")  # of the record's model facts


class ReplicaCache:
    def __init__(self, spec: JobSpec, model: dict, engine: dict):
        """`model`: the job's model identity (jobs/preflight.model_identity); `engine`: the
        replica's engine.describe(), for what actually ran (engine, version, dtype, device, commit)."""
        self.cache = RowCache(spec.cache.uri, spec.cache.storage_options)
        m = spec.model
        self.context = context_digest(
            model={
                **{k: model.get(k) for k in MODEL_IDENTITY},
                **checkpoint_identity(m.path),  # config.json, generation_config.json, code
                "commit_hash": engine.get("commit_hash"),  # the hub revision a name resolved to
                "dtype": engine.get("dtype"),
            },
            tokenizer=tokenizer_identity(m.tokenizer or m.path, m.revision),
            engine={
                **{k: engine.get(k) for k in ("engine", "engine_version", "device")},
                # Base rows of a job with adapters run through the LoRA layers too (a base row's
                # float sums may differ in the last bit): they share no entries with plain jobs.
                **({"adapters": True} if m.adapter_set() else {}),
            },
            generation=spec.generation.model_dump(mode="json"),
        )
        self.adapter_sha256 = {name: a.sha256 for name, a in m.adapter_set().items()}
        self.whitespace = "flexible" if structured.flexible(spec) else "compact"
        self._held: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self.rejected = 0  # entries found but not of the row schema (over this replica's life)

    def keys(self, requests: list[Request], stride: int) -> dict[object, str]:
        """Each request's cache key (request key = row * stride + sample index)."""
        return {
            r.key: sequence_key(
                self.context,
                r.prompt_ids,
                r.seed,
                r.key % stride,
                r.max_new_tokens,
                _params(r),
                _request_extra(r, self.adapter_sha256, self.whitespace),
            )
            for r in requests
        }

    def lookup(self, keys: dict[object, str], requests: list[Request], needs: frozenset[str]) -> dict[object, Entry]:
        """The cached sequences among `keys` (request key -> cache key), by request key; an entry
        counts when it fits its request's max_new_tokens and holds what the stages `need` and the
        request asks. A cache that cannot be read is a miss, never a failed shard; so is an entry
        that is not of the row schema (counted in `rejected`)."""
        try:
            found = self.cache.read_many(keys.values())
        except Exception as e:
            log.warning("cannot read the row cache at %s (%s); generating every row", self.cache.uri, e)
            return {}
        entries, rejected = {}, {}
        for r in requests:
            key = keys[r.key]
            if key not in found:
                continue
            try:
                entry = Entry.from_bytes(found[key])
            except ValueError as e:
                rejected[key] = e
                continue
            if entry.completion_tokens > r.max_new_tokens:
                rejected[key] = ValueError(f"completion_tokens {entry.completion_tokens} > max_new_tokens {r.max_new_tokens}")
            elif entry.fits(r.max_new_tokens, needs | _needs(r)):
                entries[r.key] = entry
            # else: an entry of a job that kept less (token ids, logprobs): a plain miss, written again
        if rejected:
            self.rejected += len(rejected)
            key, why = next(iter(rejected.items()))
            log.warning("%d row cache entries are not of the row schema and are generated again, e.g. %s: %s",
                        len(rejected), self.cache.url(key), why)  # fmt: skip
        return entries

    def hold(self, attempt: str, entries: dict[str, Entry]) -> None:
        """Keep an attempt's generated sequences until its shard is committed (or forgotten)."""
        self._held[attempt] = entries
        while len(self._held) > HELD_ATTEMPTS:
            self._held.popitem(last=False)

    def publish(self, attempt: str) -> int:
        """Write a committed attempt's sequences to the cache; how many."""
        entries = self._held.pop(attempt, {})
        self.cache.put_many(entries)
        return len(entries)
