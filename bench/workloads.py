"""The workloads: prompts of chosen token lengths with per-row new-token limits.

Every system gets the same prompt text and tokenizes it the same way
(`jobs.core.prompts.tokenize_prompt`, what a bulkgen replica does), so all of
them prefill the same token ids. Random weights rarely emit the end-of-text
token, so answer lengths are set by the per-row limits, the same on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from bench.model import pseudo_words


@dataclass(frozen=True)
class Workload:
    name: str
    texts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    limits: tuple[int, ...]  # per-row max_new_tokens
    do_sample: bool = False
    num_return_sequences: int = 1
    # Per row, the template (system prompt) its prompt starts with: augment only. bulkgen
    # never reads it; it is the key rows are grouped by in the reference orders.
    templates: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        return len(self.texts)

    @property
    def sequences(self) -> int:
        return self.rows * self.num_return_sequences

    @property
    def max_new_tokens(self) -> int:
        return max(self.limits)

    def row_id(self, i: int) -> str:
        """Row i's id (the bulkgen input's id column; per-sequence sampling seeds derive from it)."""
        return f"{self.name}-{i:05d}"

    def describe(self) -> str:
        lens = sorted(len(p) for p in self.prompt_ids)
        lim = sorted(self.limits)
        mode = f"sampling, n={self.num_return_sequences}" if self.do_sample else "greedy"
        return (
            f"{self.rows} prompts, prompt tokens {lens[0]}-{lens[-1]} (median {lens[len(lens) // 2]}), "
            f"new tokens {lim[0]}-{lim[-1]} (median {lim[len(lim) // 2]}), {mode}"
        )

    def shared_prefix_tokens(self) -> int:
        """Prompt tokens that repeat a row before them with the same template: what a
        prefix cache that never evicted could skip (0 without templates)."""
        if self.templates is None:
            return 0
        from jobs.core.prefix import common_prefix_len

        first: dict[int, tuple[int, ...]] = {}
        shared = 0
        for t, ids in zip(self.templates, self.prompt_ids):
            if t in first:
                shared += common_prefix_len(first[t], ids)
            else:
                first[t] = ids
        return shared

    def write_parquet(self, path: Path) -> Path:
        """The bulkgen input: id, prompt, max_new_tokens columns (and template_id for augment)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {
            "id": pa.array([self.row_id(i) for i in range(self.rows)]),
            "prompt": pa.array(list(self.texts)),
            "max_new_tokens": pa.array(list(self.limits), pa.int32()),
        }
        if self.templates is not None:
            columns["template_id"] = pa.array(list(self.templates), pa.int32())
        table = pa.table(columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path


def make_prompts(tokenizer, lengths: list[int], seed: int) -> tuple[list[str], list[tuple[int, ...]]]:
    """Prompt texts whose token counts are (within a token or two) `lengths`."""
    from jobs.core.prompts import tokenize_prompt
    from jobs.core.spec import InputSpec

    spec = InputSpec(uri="unused", prompt_column="prompt")
    rng = random.Random(seed)
    words = pseudo_words(rng, sum(2 * n + 4 for n in lengths))  # a word is >= 1 token
    texts, ids = [], []
    at = 0
    for n in lengths:
        take = 2 * n + 4
        text = " ".join(words[at : at + take])
        at += take
        text = tokenizer.decode(tokenize_prompt(spec, text, tokenizer)[:n])
        texts.append(text)
        ids.append(tuple(tokenize_prompt(spec, text, tokenizer)))
    return texts, ids


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    """Most values small, a long tail up to `hi`."""
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def uniform(tokenizer, rows: int, prompt_len: int, new_tokens: int, seed: int = 1) -> Workload:
    texts, ids = make_prompts(tokenizer, [prompt_len] * rows, seed)
    return Workload("uniform", tuple(texts), tuple(ids), (new_tokens,) * rows)


def long_tail(tokenizer, rows: int, prompt_range=(8, 512), new_range=(1, 256), seed: int = 2) -> Workload:
    """Prompt lengths and answer limits drawn independently: log-uniform prompts,
    uniform answers (answers carry the decode cost this benchmark is about)."""
    rng = random.Random(seed)
    lengths = [log_uniform(rng, *prompt_range) for _ in range(rows)]
    limits = [rng.randint(*new_range) for _ in range(rows)]
    texts, ids = make_prompts(tokenizer, lengths, seed)
    return Workload("long-tail", tuple(texts), tuple(ids), tuple(limits))


def sampling(tokenizer, rows: int, prompt_len: int, new_tokens: int, n: int = 4, seed: int = 3) -> Workload:
    texts, ids = make_prompts(tokenizer, [prompt_len] * rows, seed)
    return Workload(f"sampling-n{n}", tuple(texts), tuple(ids), (new_tokens,) * rows, True, n)


def augment(
    tokenizer, rows: int, templates: int, prefix_tokens: int, new_tokens: int, suffix_range=(16, 64), seed: int = 4
) -> Workload:
    """Data augmentation: `templates` system prompts of `prefix_tokens` tokens each, every row one
    of them, a newline and a suffix of its own (16-64 tokens), in shuffled order: rows that
    share a long prefix arrive interleaved with the other templates' rows."""
    from jobs.core.prompts import tokenize_prompt
    from jobs.core.spec import InputSpec

    rng = random.Random(seed)
    heads, _ = make_prompts(tokenizer, [prefix_tokens] * templates, seed)
    tails, _ = make_prompts(tokenizer, [rng.randint(*suffix_range) for _ in range(rows)], seed + 1)
    which = [i % templates for i in range(rows)]
    rng.shuffle(which)
    spec = InputSpec(uri="unused", prompt_column="prompt")
    # The newline is a token of its own, so every row's ids start with its template's ids.
    texts = [f"{heads[t]}\n{tail}" for t, tail in zip(which, tails)]
    ids = tuple(tuple(tokenize_prompt(spec, text, tokenizer)) for text in texts)
    return Workload("augment", tuple(texts), ids, (new_tokens,) * rows, templates=tuple(which))


def small_job(tokenizer, rows: int, new_tokens: int = 48, prompt_range=(8, 200), seed: int = 5) -> Workload:
    """The issue's small job: log-uniform prompts of 8-200 tokens, one new-token limit, greedy."""
    rng = random.Random(seed)
    texts, ids = make_prompts(tokenizer, [log_uniform(rng, *prompt_range) for _ in range(rows)], seed)
    return Workload("small", tuple(texts), tuple(ids), (new_tokens,) * rows)
