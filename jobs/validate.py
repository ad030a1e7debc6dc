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
    from jobs.preflight import load_tokenizer
    from workers.prompts import PROMPT_TOO_LONG, RowError, render_prompt, tokenize_prompt
    from workers.replica import read_shard_rows

    checked = validate(spec)
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


def check_model_loadable(spec: JobSpec) -> int | None:
    """Check config, architecture and weight headers without loading weights; returns the context length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = spec.model
    try:
        config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path {m.path!r}: cannot load its config: {e}") from e
    try:
        with torch.device("meta"):  # shapes and names only, no memory
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except ValueError as e:
        raise ValueError(f"model.path {m.path!r} is not a causal language model: {e}") from e
    _check_safetensors_headers(m.path, model)
    text_config = config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


def _check_safetensors_headers(path: str, model) -> None:
    import os
    from pathlib import Path

    from safetensors import safe_open

    if not os.path.isdir(path):
        return  # a hub id: its files are checked when a replica downloads them
    stored: set[str] = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:  # reads the header only
                stored.update(st.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"model weights {f} are unreadable: {e}") from e
    if not stored:
        return
    # Older checkpoints (the original gpt2, say) store names without the base model prefix.
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    stored |= {f"{prefix}{n}" for n in stored}
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    expected = {name for name, _ in model.named_parameters()} - tied
    missing = sorted(expected - stored)
    if missing:
        raise ValueError(
            f"model weights in {path} lack {len(missing)} parameters the architecture needs, e.g. {missing[:3]}"
        )
