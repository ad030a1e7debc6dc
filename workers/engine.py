"""The generation engine: batched decoding with a KV cache on any HF causal LM.

Why our own decode loop instead of `model.generate`:
- finished rows leave the batch at once, so a long-tail answer does not keep
  the short ones computing;
- every sequence samples from its own seeded generator, so its text depends
  on (job seed, row id, sample_index) only, not on which batch it shared;
- stop strings, token counts and finish reasons are decided per row.

The sampling semantics follow `transformers` (repetition penalty, no-repeat
n-grams, temperature, top-k, top-p, applied in that order), and a test
checks greedy output against `model.generate` token for token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


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
    key: int  # the caller's handle for this sequence
    prompt_ids: tuple[int, ...]
    seed: int  # seeds this sequence's own generator
    max_new_tokens: int  # may be below the job's, where the context is short


@dataclass(frozen=True)
class Completion:
    key: int
    token_ids: tuple[int, ...]  # generated tokens, end-of-sequence token excluded
    text: str
    finish_reason: str  # "stop" (eos or stop string) | "length" | "error"
    error: str | None = None  # why this one sequence could not be generated


class FatalDeviceError(RuntimeError):
    """The accelerator is in a state no retry on this replica can fix (e.g. a CUDA error)."""


@dataclass
class _Row:
    """A sequence while it decodes."""

    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated so far
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    finish_reason: str | None = None


class Engine:
    """Generates completions for batches of tokenized prompts on one model replica."""

    def __init__(self, model, tokenizer, params: SamplingParams, batch_size: int, max_batch_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = model.device
        self.pad_id = _pad_id(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        # Stop strings are found in the decoded tail of each sequence; a byte-level
        # token can be a quarter of a character, hence the factor 4.
        self.stop_window = 4 * max((len(s) for s in params.stop), default=0) + 4

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Complete every request; the result is in the requests' order.

        A batch that runs out of memory is split in two and retried, and the
        smaller size is kept for later batches. A batch that fails otherwise is
        split down to single sequences, so only the sequence that fails is
        returned as an error."""
        requests = list(requests)
        done: dict[int, Completion] = {}
        pending = self.batches(requests)
        while pending:
            batch = pending.pop(0)
            try:
                completions = self._generate_batch(batch)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    completions = [_failed(batch[0], "out of memory for a single sequence")]
                else:
                    self.batch_size = max(1, len(batch) // 2)
                    log.warning("out of memory at batch size %d; now at most %d", len(batch), self.batch_size)
                    _free_device_memory()
                    pending = self.batches(batch + [r for b in pending for r in b])
                    continue
            except Exception as e:
                if _is_fatal_device_error(e):
                    raise FatalDeviceError(str(e)) from e
                if len(batch) == 1:
                    completions = [_failed(batch[0], f"{type(e).__name__}: {e}")]
                else:
                    log.warning("batch of %d failed (%s: %s); retrying in halves", len(batch), type(e).__name__, e)
                    pending[:0] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
                    continue
            for c in completions:
                done[c.key] = c
        return [done[r.key] for r in requests]

    def batches(self, requests: list[Request]) -> list[list[Request]]:
        """Group requests of similar prompt length under the batch budgets.

        Longest first, so a batch that does not fit in memory shows it early."""
        ordered = sorted(requests, key=lambda r: (-len(r.prompt_ids), r.key))
        batches: list[list[Request]] = []
        for r in ordered:
            if batches:
                batch = batches[-1]
                longest = max(len(batch[0].prompt_ids), len(r.prompt_ids))
                new_tokens = max(max(b.max_new_tokens for b in batch), r.max_new_tokens)
                if len(batch) < self.batch_size and (len(batch) + 1) * (longest + new_tokens) <= self.max_batch_tokens:
                    batch.append(r)
                    continue
            batches.append([r])
        return batches

    @torch.inference_mode()
    def _generate_batch(self, batch: list[Request]) -> list[Completion]:
        from transformers import DynamicCache

        rows = [_Row(r, _generator(r.seed, self.device)) for r in batch]
        for row in rows:
            _index_ngrams(row.ngrams, list(row.request.prompt_ids), self.params.no_repeat_ngram_size)

        # (B, T) left-padded so the last column is every row's newest token.
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # (B, V) tokens each row has seen, for the repetition penalty.
        seen = None
        if self.params.repetition_penalty != 1.0:
            seen = torch.zeros((len(batch), self.model.config.get_text_config().vocab_size), dtype=torch.bool)
            seen = seen.to(self.device).scatter_(1, input_ids, mask.bool())

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()  # (B, V)
        next_pos = positions[:, -1] + 1  # (B,)

        active = rows  # rows still decoding, in batch order
        while True:
            tokens = self._next_tokens(logits, active, seen)  # (B,)
            token_list = tokens.tolist()
            keep = []
            for i, (row, tok) in enumerate(zip(active, token_list)):
                self._append(row, tok)
                if row.finish_reason is None:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch: no more compute is spent on them.
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                seen = seen[index] if seen is not None else None
                active = [active[i] for i in keep]
            if seen is not None:
                seen[torch.arange(len(active), device=self.device), tokens] = True
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [self._completion(row) for row in rows]

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
        history_len = len(row.request.prompt_ids) + len(row.tokens)
        row.tokens.append(token)
        n = self.params.no_repeat_ngram_size
        if n and history_len + 1 >= n:
            history = (list(row.request.prompt_ids) + row.tokens)[-n:]
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


def _failed(request: Request, error: str) -> Completion:
    return Completion(request.key, (), "", "error", error)


def _is_fatal_device_error(e: Exception) -> bool:
    # After a CUDA error (device-side assert, illegal address) the context is
    # unusable; only a new process recovers.
    return isinstance(e, RuntimeError) and ("CUDA error" in str(e) or "CUBLAS_STATUS" in str(e))


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
