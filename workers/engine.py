"""The generation engine: continuous batching with a KV cache on any HF causal LM.

Why our own decode loop instead of `model.generate`:
- a finished sequence leaves the running batch at once, and waiting ones are
  prefilled and spliced in, so long-tail answers never idle the rest;
- the batch is bounded by tokens (what the KV cache holds), not rows;
- every sequence samples from its own seeded generator, so its text depends
  on (job seed, row id, sample_index) only, not on its neighbours;
- stop strings, token counts and finish reasons are decided per sequence.

The sampling semantics follow `transformers` (repetition penalty, no-repeat
n-grams, temperature, top-k, top-p, in that order); a test checks greedy
output against `model.generate` token for token.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# Most of a prefill's token positions that may be padding. Measured on the
# long-tail benchmark (bench/): unbounded, over half of all positions the engine
# computed were prefill padding; at 0.25 it was 10% and throughput rose 1.2x.
PREFILL_PAD_LIMIT = 0.25


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    key: object  # the caller's handle for this sequence (hashable)
    prompt_ids: tuple[int, ...]
    seed: int  # seeds this sequence's own generator
    max_new_tokens: int  # may be below the job's, where the context is short


@dataclass(frozen=True)
class Completion:
    key: object
    token_ids: tuple[int, ...]  # generated tokens, end-of-sequence token excluded
    text: str
    finish_reason: str  # "stop" (eos or stop string) | "length" | "error"
    error: str | None = None  # why this one sequence could not be generated


class FatalDeviceError(RuntimeError):
    """The accelerator is in a state no retry on this replica can fix (e.g. a CUDA error)."""


@dataclass
class _Row:
    """A sequence while it decodes. Restarting it from scratch reproduces it
    exactly (its generator is re-seeded), which is what makes eviction safe."""

    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated so far
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def final_width(self) -> int:
        """Tokens this row may hold in the cache when it ends."""
        return len(self.request.prompt_ids) + self.request.max_new_tokens


@dataclass
class _Batch:
    """The running batch: rows, their KV cache and what the next forward needs."""

    rows: list[_Row]
    cache: object  # transformers DynamicCache, (B, heads, L, head_dim) per layer
    mask: torch.Tensor  # (B, L) 1 where the cache holds a real token; left padding is 0
    next_pos: torch.Tensor  # (B,) position of each row's next token
    next_input: torch.Tensor  # (B,) each row's newest token, not yet in the cache
    seen: torch.Tensor | None  # (B, V) tokens each row has seen, for the repetition penalty


class Engine:
    """Generates completions on one model replica.

    `submit` queues requests; each `step` admits waiting requests while the
    budgets allow and decodes one token for every running sequence; finished
    sequences come back from `step`. `generate` does it all for one list."""

    def __init__(self, model, tokenizer, params: SamplingParams, batch_size: int, max_batch_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.batch_size = batch_size  # current limit; lowered after running out of memory
        self.max_batch_tokens = max_batch_tokens
        self.device = model.device
        self.pad_id = _pad_id(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        # Stop strings are found in the decoded tail of each sequence; a byte-level
        # token can be a quarter of a character, hence the factor 4.
        self.stop_window = 4 * max((len(s) for s in params.stop), default=0) + 4
        self.waiting: deque[Request] = deque()
        self.running: _Batch | None = None
        self.splice = True  # refill a running batch; off for caches we cannot splice
        self.prefill_pad_limit = PREFILL_PAD_LIMIT
        self._healthy_batch_size = batch_size  # restored once a failing sequence is isolated
        # Token positions pushed through the model: real ones, and with padding.
        self.stats = {"forward_tokens": 0, "padded_tokens": 0, "prefill_positions": 0, "steps": 0}

    # -- public API -----------------------------------------------------------------

    def submit(self, requests: Iterable[Request]) -> None:
        """Queue requests; longest prompts first, so similar lengths are prefilled together
        and a batch that does not fit in memory shows it early."""
        self.waiting.extend(sorted(requests, key=lambda r: -len(r.prompt_ids)))

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running is not None

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Complete every request; the result is in the requests' order."""
        requests = list(requests)
        self.submit(requests)
        done: dict = {}
        while self.has_work():
            for c in self.step():
                done[c.key] = c
        return [done[r.key] for r in requests]

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit what fits, decode one token for every running sequence; return the finished."""
        finished: list[Completion] = []
        try:
            self._admit(finished)
            if self.running is not None:
                self._decode(finished)
        except Exception as e:
            self._recover(e, finished)
        return finished

    # -- admission and prefill -----------------------------------------------------------

    def _admit(self, finished: list[Completion]) -> None:
        running = self.running
        if running is not None and not self.splice:
            return
        free = self.batch_size - (len(running.rows) if running else 0)
        # Prefill in chunks worth the extra forward, not one row per step.
        if not self.waiting or free <= 0 or (running is not None and free < max(1, self.batch_size // 4)):
            return
        width = max((r.final_width for r in running.rows), default=0) if running else 0
        count = len(running.rows) if running else 0
        chunk: list[Request] = []
        prompt_width = prompt_sum = 0
        while self.waiting and len(chunk) < free:
            r = self.waiting[0]
            new_width = max(width, len(r.prompt_ids) + r.max_new_tokens)
            # The padded cache holds (rows x widest row) tokens; a single row always fits.
            if (count + 1) * new_width > self.max_batch_tokens and count > 0:
                break
            # One prefill pads every prompt to the chunk's longest: stop before padding
            # passes prefill_pad_limit of its positions, and prefill the rest on later
            # steps with prompts of their own length.
            pw, ps = max(prompt_width, len(r.prompt_ids)), prompt_sum + len(r.prompt_ids)
            if chunk and (len(chunk) + 1) * pw - ps > self.prefill_pad_limit * (len(chunk) + 1) * pw:
                break
            chunk.append(self.waiting.popleft())
            width, count = new_width, count + 1
            prompt_width, prompt_sum = pw, ps
        if not chunk:
            return
        try:
            batch = self._prefill(chunk, finished)
        except Exception as e:
            # The chunk is at fault, not the running batch: that one decodes on.
            self._isolate(chunk, e, finished)
            return
        if batch is not None:
            self.running = batch if running is None else _merge(running, batch)

    def _prefill(self, chunk: list[Request], finished: list[Completion]) -> _Batch | None:
        from transformers import DynamicCache

        rows = [_Row(r, _generator(r.seed, self.device)) for r in chunk]
        for row in rows:
            _index_ngrams(row.ngrams, list(row.request.prompt_ids), self.params.no_repeat_ngram_size)
        # (B, T) left-padded so the last column is every row's newest token.
        width = max(len(r.prompt_ids) for r in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = None
        if self.params.repetition_penalty != 1.0:
            vocab = self.model.config.get_text_config().vocab_size
            seen = torch.zeros((len(chunk), vocab), dtype=torch.bool, device=self.device)
            # Padding points at the row's last real token, so every write is True
            # (duplicate scatter indices with different values are undefined on CUDA).
            seen.scatter_(1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)

        cache = DynamicCache(config=self.model.config)
        self.splice = self.splice and _spliceable(cache)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats["forward_tokens"] += int(mask.sum())
        self.stats["padded_tokens"] += mask.numel()
        self.stats["prefill_positions"] += mask.numel()
        self.splice = self.splice and _spliceable(cache)
        batch = _Batch(rows, cache, mask, positions[:, -1] + 1, input_ids[:, -1], seen)
        return self._sample_and_retire(batch, out.logits[:, -1, :].float(), finished)

    # -- decoding ------------------------------------------------------------------------

    def _decode(self, finished: list[Completion]) -> None:
        b = self.running
        if b.seen is not None:
            b.seen[torch.arange(len(b.rows), device=self.device), b.next_input] = True
        b.mask = torch.cat([b.mask, b.mask.new_ones((len(b.rows), 1))], dim=1)
        out = self.model(
            input_ids=b.next_input[:, None],
            attention_mask=b.mask,
            position_ids=b.next_pos[:, None],
            past_key_values=b.cache,
            use_cache=True,
        )
        self.stats["steps"] += 1
        self.stats["forward_tokens"] += len(b.rows)
        self.stats["padded_tokens"] += len(b.rows)
        b.next_pos = b.next_pos + 1
        self.running = self._sample_and_retire(b, out.logits[:, -1, :].float(), finished)

    def _sample_and_retire(self, b: _Batch, logits: torch.Tensor, finished: list[Completion]) -> _Batch | None:
        """Pick every row's next token; finished rows leave the batch (no more compute on them)."""
        tokens = self._next_tokens(logits, b.rows, b.seen)  # (B,)
        keep = []
        for i, (row, tok) in enumerate(zip(b.rows, tokens.tolist())):
            self._append(row, tok)
            if row.finish_reason is None:
                keep.append(i)
            else:
                finished.append(self._completion(row))
        if not keep:
            return None
        b.next_input = tokens
        if len(keep) < len(b.rows):
            index = torch.tensor(keep, device=self.device)
            b.cache.batch_select_indices(index)
            b.rows = [b.rows[i] for i in keep]
            b.mask, b.next_pos, b.next_input = b.mask[index], b.next_pos[index], b.next_input[index]
            b.seen = b.seen[index] if b.seen is not None else None
            if self.splice:
                _trim_left_padding(b)
        return b

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row], seen: torch.Tensor | None) -> torch.Tensor:
        """Pick each row's next token from its (V,) logits; returns (B,)."""
        p = self.params
        if seen is not None:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.no_repeat_ngram_size:
            n = p.no_repeat_ngram_size
            for i, row in enumerate(rows):
                history = list(row.request.prompt_ids) + row.tokens
                if len(history) >= n - 1:
                    banned = row.ngrams.get(tuple(history[len(history) - n + 1 :]), ())
                    if banned:
                        logits[i, list(banned)] = float("-inf")
        if not p.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            # As transformers does: drop the low tail whose mass is <= 1 - top_p, keep at least one.
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            tail = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - p.top_p
            tail[:, -1] = False
            logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        probs = logits.softmax(dim=-1)
        # One draw per row from the row's own generator: a row's sample never
        # depends on its neighbours in the batch.
        picks = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
        return torch.cat(picks)

    def _append(self, row: _Row, token: int) -> None:
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.tokens.append(token)
        n = self.params.no_repeat_ngram_size
        if n:
            history = list(row.request.prompt_ids[-(n - 1) :] if n > 1 else ()) + row.tokens[-n:]
            if len(history) >= n:
                history = history[-n:]
                row.ngrams.setdefault(tuple(history[:-1]), set()).add(history[-1])
        if self.params.stop:
            tail = self.tokenizer.decode(row.tokens[-self.stop_window :], skip_special_tokens=True)
            if any(s in tail for s in self.params.stop):
                row.finish_reason = "stop"
                return
        if len(row.tokens) >= row.request.max_new_tokens:
            row.finish_reason = "length"

    def _completion(self, row: _Row) -> Completion:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        return Completion(row.request.key, tuple(row.tokens), text, row.finish_reason or "length")

    # -- failures ----------------------------------------------------------------------

    def _recover(self, error: Exception, finished: list[Completion]) -> None:
        """A decode step failed: out of memory, or a sequence that breaks the model."""
        involved = [row.request for row in self.running.rows] if self.running else []
        self.running = None
        self._isolate(involved, error, finished)

    def _isolate(self, suspects: list[Request], error: Exception, finished: list[Completion]) -> None:
        """Restart the suspects in smaller batches (they reproduce exactly), until the
        one at fault runs alone and comes back as an error."""
        if _is_fatal_device_error(error):
            raise FatalDeviceError(str(error)) from error
        _free_device_memory()
        if len(suspects) == 1:
            reason = "out of memory for a single sequence" if _is_oom(error) else f"{type(error).__name__}: {error}"
            finished.append(Completion(suspects[0].key, (), "", "error", reason))
            if not _is_oom(error):
                self.batch_size = self._healthy_batch_size
            return
        self.batch_size = max(1, len(suspects) // 2)
        if _is_oom(error):
            self._healthy_batch_size = self.batch_size  # remembered for this replica
        log.warning(
            "%s with %d sequences; retrying at most %d at a time",
            "out of memory" if _is_oom(error) else f"{type(error).__name__}: {error}",
            len(suspects),
            self.batch_size,
        )
        self.waiting.extendleft(reversed(suspects))


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch from two: left-pad the narrower cache and mask, stack the rows."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for x in (a, b):
        pad = width - x.mask.shape[1]
        if pad:
            x.mask = torch.nn.functional.pad(x.mask, (pad, 0))
            for layer in x.cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([la.keys, lb.keys])
        la.values = torch.cat([la.values, lb.values])
    seen = torch.cat([a.seen, b.seen]) if a.seen is not None else None
    return _Batch(
        a.rows + b.rows,
        a.cache,
        torch.cat([a.mask, b.mask]),
        torch.cat([a.next_pos, b.next_pos]),
        torch.cat([a.next_input, b.next_input]),
        seen,
    )


def _trim_left_padding(b: _Batch) -> None:
    """Drop leading cache columns that no remaining row uses (their long neighbours left)."""
    used = b.mask.any(dim=0)
    first = int(used.float().argmax())
    if first > 0:
        b.mask = b.mask[:, first:]
        for layer in b.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]


def _spliceable(cache) -> bool:
    # Rows can be spliced in and padding trimmed only where every layer is a
    # plain growing cache; sliding-window and linear-attention layers keep
    # state we do not rewrite, so those models decode batch by batch instead.
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError)


def _is_fatal_device_error(e: Exception) -> bool:
    # After a CUDA error (device-side assert, illegal address) the context is
    # unusable; only a new process recovers.
    return isinstance(e, RuntimeError) and not _is_oom(e) and ("CUDA error" in str(e) or "CUBLAS_STATUS" in str(e))


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _index_ngrams(ngrams: dict, tokens: list[int], n: int) -> None:
    if n:
        for i in range(len(tokens) - n + 1):
            ngrams.setdefault(tuple(tokens[i : i + n - 1]), set()).add(tokens[i + n - 1])


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _pad_id(model, tokenizer) -> int:
    # Padding is masked out, so any valid id works when the tokenizer has none.
    for candidate in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None)):
        if candidate is not None:
            return candidate
    eos = _eos_ids(model, tokenizer)
    return min(eos) if eos else 0
