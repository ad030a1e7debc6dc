"""Evaluation against references and quality filters: what a replica does to a shard's
generated sequences before it stages them.

Evaluation adds per-row columns (sacreBLEU's sentence BLEU and chrF, rouge-score's
ROUGE-1/2/L F-measures) against the input's `evaluation.reference_column`; the
report aggregates them. Filters send a sequence to filtered/ with the filter's
name instead of data/: never silently away. They run in order: the per-sequence
rules, then duplicates among a row's own samples, then duplicates across the job
(jobs/dedupe_index.py, shared by the replicas).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.core.dedupe import Print
from jobs.core.rows import EVALUATION_FIELDS
from jobs.core.spec import EvaluationSpec, FiltersSpec

EVALUATION_COLUMNS = tuple(f.name for f in EVALUATION_FIELDS)  # the schema's names, spelled in rows.py


class Evaluator:
    def __init__(self, spec: EvaluationSpec):
        from rouge_score import rouge_scorer

        self.reference_column = spec.reference_column
        self.rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def scores(self, text: str, row: dict) -> dict[str, float | None]:
        """The row's scores (None without a reference)."""
        import sacrebleu

        reference = row.get(self.reference_column)
        if reference is None:
            return dict.fromkeys(EVALUATION_COLUMNS)
        rouge = self.rouge.score(reference, text)
        return {
            "bleu": sacrebleu.sentence_bleu(text, [reference]).score,
            "chrf": sacrebleu.sentence_chrf(text, [reference]).score,
            **{name: rouge[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")},
        }


@dataclass
class Candidate:
    """One generated sequence on its way to data/ or filtered/."""

    row_index: int
    sample_index: int
    text: str
    prompt: str
    completion_tokens: int
    mean_logprob: float | None = None  # logprob_sum / completion_tokens; None: no logprobs, or no tokens
    dropped_by: str | None = None


class Filters:
    def __init__(self, spec: FiltersSpec, job_index=None):
        """`job_index`: a jobs.core.dedupe index handle for duplicates across the job (or None)."""
        self.spec = spec
        self.must_match = re.compile(spec.must_match) if spec.must_match else None
        self.must_not_match = re.compile(spec.must_not_match) if spec.must_not_match else None
        self.job_index = job_index

    def apply(self, candidates: list[Candidate], keys: list) -> None:
        """Set `dropped_by` on the candidates a filter drops; `keys` are their (id, sample_index)."""
        for c in candidates:
            c.dropped_by = self._rule(c)
        kept = [(c, k) for c, k in zip(candidates, keys) if c.dropped_by is None]
        if self.spec.deduplicate == "none":
            return
        near = self.spec.deduplicate == "near"
        prints = [Print(c.text, near) for c, _ in kept]
        # Among a row's own samples: the first one stays.
        seen: dict[int, list] = {}
        for (c, _), p in zip(kept, prints):
            earlier = seen.setdefault(c.row_index, [])
            if any(p.similar(q, self.spec.near_duplicate_threshold) for q in earlier):
                c.dropped_by = "near_duplicate" if near else "duplicate"
            else:
                earlier.append(p)
        if self.job_index is None:
            return
        # Across the job: the index keeps the first sequence it was shown of each group.
        survivors = [(c, k, p) for (c, k), p in zip(kept, prints) if c.dropped_by is None]
        duplicates = self.job_index.check_and_add([(k, p) for _, k, p in survivors])
        for (c, _, _), duplicate in zip(survivors, duplicates):
            if duplicate:
                c.dropped_by = "near_duplicate" if near else "duplicate"

    def _rule(self, c: Candidate) -> str | None:
        s = self.spec
        text = c.text.strip()
        if s.drop_empty and not text:
            return "empty"
        if s.min_completion_tokens is not None and c.completion_tokens < s.min_completion_tokens:
            return "min_completion_tokens"
        if s.max_completion_tokens is not None and c.completion_tokens > s.max_completion_tokens:
            return "max_completion_tokens"
        if s.min_mean_logprob is not None and c.mean_logprob is not None and c.mean_logprob < s.min_mean_logprob:
            return "min_mean_logprob"
        if self.must_match is not None and not self.must_match.search(c.text):
            return "must_match"
        if self.must_not_match is not None and self.must_not_match.search(c.text):
            return "must_not_match"
        if s.drop_prompt_echo and text and text in c.prompt:
            return "prompt_echo"
        return None
