"""`bulkgen validate`: everything that can be checked before a GPU is held.

Spec, input files and schema, id uniqueness (jobs.driver.validate), then a
scan of the prompts: rendered and tokenized on this machine, measured
against the model's context, and the model checked loadable without loading
its weights (config, architecture, safetensors headers against the model's
parameter names).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from jobs.spec import JobSpec


@dataclass
class Report:
    rows: int
    shards: int
    files: int
    context: int | None
    model: str
    prompt_tokens: list[int] = field(default_factory=list)
    would_fail: Counter = field(default_factory=Counter)  # error code -> rows
    examples: dict = field(default_factory=dict)  # error code -> (row id, message)
    scanned: int = 0

    def render(self) -> str:
        lines = [
            f"input:   {self.rows} rows in {self.files} files -> {self.shards} shards",
            f"model:   {self.model} (context {self.context or 'unknown'} tokens)",
        ]
        if self.prompt_tokens:
            t = np.array(self.prompt_tokens)
            p50, p95 = np.percentile(t, [50, 95])
            lines.append(
                f"prompts: {self.scanned} scanned; tokens min {t.min()} / p50 {p50:.0f} / p95 {p95:.0f} / max {t.max()}"
            )
        if self.would_fail:
            lines.append(f"would fail: {sum(self.would_fail.values())} rows")
            for code, count in self.would_fail.most_common():
                row_id, message = self.examples[code]
                lines.append(f"  {code}: {count} rows, e.g. {row_id}: {message}")
        else:
            lines.append("would fail: none")
        return "\n".join(lines)


def validate_report(spec: JobSpec, max_rows: int | None = None) -> Report:
    from jobs.driver import validate
    from jobs.preflight import check_model_loadable, load_tokenizer
    from workers.prompts import PROMPT_TOO_LONG, RowError, render_prompt, tokenize_prompt
    from workers.replica import read_shard_rows

    checked = validate(spec)  # includes the model checks; this repeats one to learn the context
    context = check_model_loadable(spec)
    tokenizer = load_tokenizer(spec)
    report = Report(
        rows=checked.input_rows,
        shards=len(checked.shards),
        files=len({s.url for s in checked.shards}),
        context=context,
        model=spec.model.path,
    )
    for shard in checked.shards:
        table = read_shard_rows(spec, shard)
        for i, row in enumerate(table.to_pylist()):
            if max_rows is not None and report.scanned >= max_rows:
                return report
            report.scanned += 1
            row_id = row[spec.input.id_column] if spec.input.id_column else f"{shard.relpath}:{shard.start + i}"
            try:
                n_tokens = len(tokenize_prompt(spec.input, render_prompt(spec.input, row, tokenizer), tokenizer))
                if context and n_tokens >= context:
                    raise RowError(PROMPT_TOO_LONG, f"prompt is {n_tokens} tokens; the model's context is {context}")
                report.prompt_tokens.append(n_tokens)
            except RowError as e:
                report.would_fail[e.code] += 1
                report.examples.setdefault(e.code, (row_id, str(e)))
    return report
