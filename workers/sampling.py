"""Next-token choice for the transformers engine, with the semantics of `transformers`' generate:
repetition penalty, no-repeat n-grams, temperature, top-k, top-p, in that order.

Every row samples from its own seeded generator, so a row's text depends on
(job seed, row id, sample_index) only, never on its neighbours in the batch.
A row whose request has its own parameters (a batch request's temperature,
top_p, top_k) is chosen with those; every step picks the rows of one set of
parameters together, and each row's choice reads only its own logits.
"""

from __future__ import annotations

import torch

from workers.engine import SamplingParams
from workers.kv_batch import Row


def next_tokens(p: SamplingParams, logits: torch.Tensor, rows: list[Row], seen: torch.Tensor | None) -> torch.Tensor:
    """Pick each row's next token from its (V,) logits, with its request's parameters or else `p`;
    (B, V) float logits in, (B,) token ids out."""
    groups: dict[SamplingParams, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.request.params or p, []).append(i)
    if len(groups) == 1:  # the common case (no request of its own): the whole batch at once
        return _next_tokens(next(iter(groups)), logits, rows, seen)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    for params, members in groups.items():
        index = torch.tensor(members, device=logits.device)
        picked = _next_tokens(params, logits[index], [rows[i] for i in members], None if seen is None else seen[index])
        tokens[index] = picked
    return tokens


def _next_tokens(p: SamplingParams, logits: torch.Tensor, rows: list[Row], seen: torch.Tensor | None) -> torch.Tensor:
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


def index_ngrams(ngrams: dict, tokens: list[int], n: int) -> None:
    """Record every n-gram of `tokens`: (first n-1 tokens) -> {last tokens seen after them}."""
    if n:
        for i in range(len(tokens) - n + 1):
            ngrams.setdefault(tuple(tokens[i : i + n - 1]), set()).add(tokens[i + n - 1])


def note_ngram(row: Row, n: int) -> None:
    """Record the n-gram that the row's newest token completes."""
    if n:
        history = list(row.request.prompt_ids[-(n - 1) :] if n > 1 else ()) + row.tokens[-n:]
        if len(history) >= n:
            history = history[-n:]
            row.ngrams.setdefault(tuple(history[:-1]), set()).add(history[-1])


def generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
