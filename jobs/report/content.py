"""What the report says, section by section, from what jobs/report/data.py read.

The headline numbers come from the job record as it is (what `bulkgen
status` shows), so the report and the record never disagree; the sections
come from the committed files. A section whose data is absent (no errors, no
filters, no evaluation columns) says so in a line or is left out; so is the
section of a generation feature whose columns data/ lacks (structured output,
logprobs, adapters, reasoning).

Over 300 lines because every section is here, so data.py only reads and
render.py only lays out.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import numpy as np

from jobs.core.prompts import BAD_SCHEMA, STRUCTURED_INCOMPLETE, STRUCTURED_INVALID
from jobs.core.rows import ADAPTER, LOGPROB_SUM, REASONING_TOKENS, STRUCTURED
from jobs.core.times import now, seconds_between
from jobs.record import JobState
from jobs.report import figures
from jobs.report.data import EVALUATION_COLUMNS, OutputData
from jobs.report.diversity import diversity, most_repeated
from jobs.report.features import BASE_MODEL, LOGPROB_EDGES
from jobs.report.render import Fact, Figure, Report, Section, Table

TEXT_CHARS = 200  # of a text or an error message in a table
REPEATED = 10  # most repeated outputs listed
# The dead letters of structured output, and what each means.
STRUCTURED_DEAD_LETTERS = {
    STRUCTURED_INCOMPLETE: "max_new_tokens came before the constraint was satisfied",
    STRUCTURED_INVALID: "the completion ended without satisfying its constraint",
    BAD_SCHEMA: "the row's own schema (input.schema_column) is no usable JSON schema",
}


def build(d: OutputData) -> Report:
    record = d.record
    name = record.get("name") or "(unnamed job)"
    sections = [
        _throughput(d),
        _lengths(d),
        _finish_reasons(d),
        _errors(d),
        *_filtered(d),
        *_structured(d),
        *_logprobs(d),
        *_adapters(d),
        *_reasoning(d),
        *_evaluation(d),
        _repeats_and_diversity(d),
    ]
    texts = f"{len(d.sample):,} texts sampled" if d.sample else "no texts sampled"
    footer = (
        f"bulkgen report of {d.uri}, built {now()} from {len(d.commits):,} committed shards "
        f"({d.rows:,} rows read, {texts}). Job {name} [{record.get('fingerprint')}], "
        f"bulkgen {record.get('versions', {}).get('bulkgen', '?')}."
    )
    if d.missing_files:  # a shard being rewritten (retry-failed) as the report read the output
        footer += f" {len(d.missing_files)} committed files were gone when read: {', '.join(d.missing_files[:3])}."
    return Report(f"bulkgen report: {name}", notice(d), facts(record, d.driver_alive), sections, footer)


def notice(d: OutputData) -> str | None:
    """The line a reader must see first when the job did not simply succeed, or some of
    its committed files could not be read."""
    state_notice = _state_notice(d)
    if not d.unreadable_files:
        return state_notice
    unreadable = (f"{len(d.unreadable_files)} committed file(s) could not be read (truncated or corrupt?) and "
                  f"are left out of every number below: {'; '.join(d.unreadable_files[:3])}")
    return f"{state_notice}. {unreadable}" if state_notice else unreadable


def _state_notice(d: OutputData) -> str | None:
    c, state = d.record.get("counts", {}), d.state
    so_far = f"{c.get('shards_committed', 0):,} of {c.get('shards_total', 0):,} shards committed"
    error = d.record.get("error") or {}
    if state is JobState.SUCCEEDED:
        return None
    if state is JobState.RUNNING and d.driver_alive:
        return f"running: a report of the {so_far} so far (record updated {d.record.get('updated_at')})"
    if state is JobState.RUNNING:
        return (f"the record says running, but its driver is gone (killed?): a report of the {so_far} "
                "before it stopped; `bulkgen resume` finishes the job")
    if state is JobState.FAILED:
        return f"failed (while {error.get('where', '?')}): {error.get('message', 'no message')}; {so_far}"
    if state is JobState.CANCELLED:
        return f"cancelled: {error.get('message', '')}; {so_far}"
    return f"{state.value}: the job has not started generating; {so_far}"


def facts(record: dict, driver_alive: bool = False) -> list[Fact]:
    """The job at a glance, from its record."""
    c = record.get("counts", {})
    model = record.get("model", {})
    engine = model.get("replica", {})
    runs = record.get("runs") or [{}]
    plan = runs[-1].get("replica_plan") or {}
    wall = wall_seconds(record, driver_alive)
    tokens = c.get("completion_tokens", 0)
    engine_name = " ".join(str(engine[k]) for k in ("engine", "engine_version") if engine.get(k))
    model_name = str(model.get("path", "-")) + (f"@{model['revision']}" if model.get("revision") else "")
    out = [
        Fact("state", "state", record.get("state", "pending")),
        Fact("rows_generated", "rows generated", f"{c.get('rows_done', 0) - c.get('rows_cached', 0):,}"),
        Fact("rows_cached", "rows from the cache", f"{c.get('rows_cached', 0):,}"),
        Fact("rows_failed", "rows failed", f"{c.get('rows_failed', 0):,}"),
    ]
    if c.get("rows_filtered") or (record.get("spec") or {}).get("filters"):
        out.append(Fact("rows_filtered", "rows filtered", f"{c['rows_filtered']:,}"))
    out += [
        Fact("rows_total", "rows in the job", f"{c.get('rows_total', 0):,}"),
        Fact("shards", "shards committed", f"{c.get('shards_committed', 0):,}/{c.get('shards_total', 0):,}"),
        Fact("wall_time", "wall time", duration(wall) if wall is not None else "-"),
        Fact("tokens_per_second", "tokens/s over the wall time", f"{tokens / wall:,.1f}" if wall else "-"),
        Fact("completion_tokens", "tokens generated", f"{tokens:,}"),
        Fact("engine", "engine", engine_name or "-"),
        Fact("model", "model", model_name),
        Fact("replicas", "replicas", str(plan.get("launched", len(runs[-1].get("replicas") or {})))),
    ]
    if len(runs) > 1:
        out.append(Fact("runs", "driver runs", str(len(runs))))
    reuse = prefix_reuse(runs)
    if reuse is not None:
        out.append(Fact("prefix_reuse", "prompt tokens reused", reuse))
    return out


# Engine counters of prompt tokens not computed because another row's prompt shared them:
# vLLM's prefix cache hits (workers/vllm_engine.py), the transformers engine's shared-prefix prefill.
REUSE_COUNTERS = {
    "cached_prompt_tokens": "from vLLM's prefix cache",
    "prefix_shared_tokens": "prefilled once for rows sharing a prefix",
}


def prefix_reuse(runs: list[dict]) -> str | None:
    """How many prompt tokens the replicas reused, summed over every run's replicas (their
    counters are per replica process, and each run starts its own), with the share of the
    prompt tokens they were given where the engine counts those; None when no engine counted."""
    totals: Counter[str] = Counter()
    for run in runs:
        for counters in (run.get("replicas") or {}).values():
            totals.update({k: counters[k] for k in (*REUSE_COUNTERS, "prompt_tokens") if k in counters})
    parts = []
    for counter, how in REUSE_COUNTERS.items():
        if counter not in totals:
            continue
        reused, given = totals[counter], totals["prompt_tokens"]
        share = f" ({reused / given:.1%} of {given:,})" if given else ""
        parts.append(f"{reused:,}{share} {how}")
    return "; ".join(parts) or None


def wall_seconds(record: dict, driver_alive: bool = False) -> float | None:
    """From the job's first start (state running) to its end; to now while its driver runs,
    to the record's last update when the driver is gone. A resumed job counts the pause too."""
    start = record.get("started_at")
    if not start:
        return None
    end = record.get("finished_at") or (now() if driver_alive else record.get("updated_at"))
    return max(seconds_between(start, end), 0.0) if end else None


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# -- sections ----------------------------------------------------------------------------------


def _start(d: OutputData) -> str:
    runs = d.record.get("runs") or [{}]
    return d.record.get("started_at") or runs[0].get("started_at") or datetime.now(timezone.utc).isoformat()


def _throughput(d: OutputData) -> Section:
    s = Section("Throughput")
    c = d.record.get("counts", {})
    if not d.commits:
        s.blocks.append("No shard committed yet.")
        return s
    pids = {x.replica_pid for x in d.commits if x.replica_pid is not None}
    s.blocks.append(
        f"{len(d.commits):,} shards committed by {len(pids) or 'unknown'} replicas; "
        f"{c.get('shards_retried', 0):,} shard attempts redone."
    )
    drawn = [
        (figures.throughput(d.commits, _start(d)), "throughput", "Completion tokens/s over time and rows committed"),
        (figures.replicas(d.commits, _start(d)), "replicas", "Work per replica"),
    ]
    s.blocks += [Figure(name, caption, png) for png, name, caption in drawn if png]
    if len(s.blocks) == 1:
        s.blocks.append("The commit records hold no timings (written by an older bulkgen).")
    return s


def _lengths(d: OutputData) -> Section:
    s = Section("Prompt and completion lengths")
    png = figures.lengths(d.prompt_tokens, d.completion_tokens)
    if png is None:
        s.blocks.append("No generated rows yet.")
        return s
    s.blocks.append(Figure("lengths", "Prompt and completion lengths in tokens", png))
    rows = [[what, *_quantiles(h)] for what, h in (("prompt", d.prompt_tokens), ("completion", d.completion_tokens))]
    s.blocks.append(Table(["tokens", "mean", "p50", "p90", "p99", "max"], rows))
    return s


def _quantiles(histogram: np.ndarray) -> list[str]:
    total = histogram.sum()
    if not total:
        return ["-"] * 5
    cumulative = np.cumsum(histogram)
    at = [int(np.searchsorted(cumulative, q * total)) for q in (0.5, 0.9, 0.99)]
    mean = (np.arange(len(histogram)) * histogram).sum() / total
    return [f"{mean:.1f}", *map(str, at), str(int(np.nonzero(histogram)[0].max()))]


def _finish_reasons(d: OutputData) -> Section:
    s = Section("Finish reasons")
    if not d.finish_reasons:
        s.blocks.append("No generated rows yet.")
        return s
    s.blocks.append("stop: the model ended the text (or a stop string did); length: it hit max_new_tokens.")
    png = figures.categories(d.finish_reasons, "finish reason")
    s.blocks.append(Figure("finish_reasons", "Rows by finish reason", png))
    s.blocks.append(_count_table("finish reason", d.finish_reasons))
    return s


def _count_table(what: str, counts) -> Table:
    total = sum(counts.values())
    return Table([what, "rows", "share"], [[str(k), f"{n:,}", f"{n / total:.1%}"] for k, n in counts.most_common()])


def _errors(d: OutputData) -> Section:
    s = Section("Errors")
    if not d.errors.counts:
        s.blocks.append("No row failed." if d.commits else "No shard committed yet.")
        return s
    png = figures.categories(d.errors.counts, "error code")
    s.blocks.append(Figure("error_codes", "Failed rows by error code", png))
    s.blocks.append(_count_table("error code", d.errors.counts))
    s.blocks.append("Examples (the first rows of each code; all of them are in errors/):")
    rows = []
    for code, examples in sorted(d.errors.examples.items()):
        for row in examples:
            rows.append([code, _row_key(row), _clip(row.get("error", ""))])
    s.blocks.append(Table(["error code", "row (id, sample_index)", "error"], rows))
    return s


def _filtered(d: OutputData) -> list[Section]:
    counted = d.record.get("counts", {}).get("rows_filtered")
    if not d.filtered.counts and not counted:
        return []
    s = Section("Filtered rows")
    if counted is not None:
        s.blocks.append(f"{counted:,} rows dropped by the quality filters, each kept in filtered/ with its filter.")
    if d.filtered.counts:
        png = figures.categories(d.filtered.counts, "filter")
        s.blocks.append(Figure("filters", "Rows dropped by each filter", png))
        s.blocks.append(_count_table("filter", d.filtered.counts))
        examples = sorted(d.filtered.examples.items())
        rows = [[name, _row_key(r), _clip(r.get("text") or "")] for name, dropped in examples for r in dropped]
        s.blocks.append(Table(["filter", "row (id, sample_index)", "text"], rows))
    return [s]


def _structured(d: OutputData) -> list[Section]:
    f = d.features
    failed = {code: d.errors.counts[code] for code in STRUCTURED_DEAD_LETTERS if d.errors.counts[code]}
    if STRUCTURED.name not in f.present and not failed:
        return []
    s = Section("Structured output")
    by_kind = f.structured + d.filtered.structured  # a row a filter dropped had satisfied its constraint too
    valid = sum(by_kind.values())
    asked = valid + sum(failed.values())
    if not asked:
        s.blocks.append("No row asked for structured output.")
        return [s]
    s.blocks.append(
        f"{valid:,} of {asked:,} completions that asked for a constraint satisfied it: a valid rate of "
        f"{valid / asked:.1%}. Valid ones are in data/ (or filtered/, when a filter dropped them); the others "
        "are dead letters in errors/."
    )
    rows = [["valid", f"{valid:,}", f"{valid / asked:.1%}", "in data/ or filtered/"]]
    rows += [[code, f"{n:,}", f"{n / asked:.1%}", STRUCTURED_DEAD_LETTERS[code]] for code, n in failed.items()]
    s.blocks.append(Table(["outcome", "rows", "share", "meaning"], rows))
    if by_kind:
        s.blocks.append("Valid completions by the kind of their constraint (a dead letter keeps no kind):")
        s.blocks.append(_count_table("kind", by_kind))
    if f.json_parsed:
        s.blocks.append(f"Of the JSON kinds' rows in data/, {f.json_parsed[True]:,} parse as JSON and "
                        f"{f.json_parsed[False]:,} do not.")  # fmt: skip
    return [s]


def _logprobs(d: OutputData) -> list[Section]:
    f = d.features
    if LOGPROB_SUM.name not in f.present:
        return []
    s = Section("Log-probabilities")
    rows = f.logprob_rows
    if not rows:
        s.blocks.append("No row in data/ has logprobs." if d.rows else "No generated rows yet.")
        return [s]
    mean = f.mean_logprob_total / rows
    s.blocks.append(
        f"Each row's mean token logprob (logprob_sum / completion_tokens, in nats), over the {rows:,} rows of "
        "data/ with logprobs (rows a filter dropped are not among them); nearer 0 is text the model found likelier. "
        f"Each quantile is the upper edge of its {LOGPROB_EDGES[1] - LOGPROB_EDGES[0]:.1f}-wide bin: at least that "
        "share of rows lies at or below it."
    )
    quantiles = [f"{_bin_quantile(f.mean_logprobs, q):.1f}" for q in (0.1, 0.5, 0.9)]
    s.blocks.append(Table(["rows", "mean", "p10", "p50", "p90"], [[f"{rows:,}", f"{mean:.3f}", *quantiles]]))
    png = figures.mean_logprobs(LOGPROB_EDGES, f.mean_logprobs, mean)
    s.blocks.append(Figure("mean_logprobs", "Rows by mean token logprob", png))
    return [s]


def _bin_quantile(counts: np.ndarray, q: float) -> float:
    """The upper edge of the LOGPROB_EDGES bin where the cumulative count reaches the share q."""
    cumulative = np.cumsum(counts)
    return float(LOGPROB_EDGES[int(np.searchsorted(cumulative, q * cumulative[-1])) + 1])


def _adapters(d: OutputData) -> list[Section]:
    f = d.features
    if ADAPTER.name not in f.present:
        return []
    s = Section("Adapters")
    if not f.adapters:
        s.blocks.append("No generated rows yet.")
        return [s]
    s.blocks.append(f"Rows in data/ by the adapter that generated them; {BASE_MODEL} is the base model, no adapter.")
    s.blocks.append(Figure("adapters", "Rows per adapter", figures.categories(f.adapters, "adapter")))
    s.blocks.append(_count_table("adapter", f.adapters))
    return [s]


def _reasoning(d: OutputData) -> list[Section]:
    f = d.features
    if REASONING_TOKENS.name not in f.present:
        return []
    s = Section("Reasoning")
    if not f.reasoning_rows:
        s.blocks.append("No generated rows yet.")
        return [s]
    rows, thinking_rows = f.reasoning_rows, int(f.reasoning_tokens.sum())
    thinking, completion = f.thinking_tokens, f.reasoning_completion_tokens
    s.blocks.append(
        f"{thinking_rows:,} of {rows:,} rows thought before answering ({thinking_rows / rows:.1%}): "
        "the thinking is in the reasoning column, the answer in text. The thinking took "
        f"{thinking:,} of their {completion:,} completion tokens ({thinking / completion if completion else 0:.1%})."
    )
    if thinking_rows:
        s.blocks.append(Table(["thinking tokens", "mean", "p50", "p90", "p99", "max"],
                              [["per row with thinking", *_quantiles(f.reasoning_tokens)]]))  # fmt: skip
    return [s]


def _evaluation(d: OutputData) -> list[Section]:
    overall = d.corpus
    scores = d.scores
    metrics = scores.metrics
    if not overall and not metrics:
        return []
    s = Section("Evaluation")
    if overall:
        s.blocks.append(f"Corpus scores (sacreBLEU) over {d.corpus_rows:,} rows of data/ and their references:")
        s.blocks.append(Table(["metric", "score"], [[k, f"{v:.2f}"] for k, v in overall.items()]))
    if metrics:
        samples = sorted(scores.by_sample)
        header = ["metric", "mean per row", *([f"best of {d.max_sample_index + 1}"] if d.max_sample_index else [])]
        header += [f"sample {i}" for i in samples] if len(samples) > 1 else []
        rows = []
        for m in metrics:
            row = [m, f"{scores.total[m] / scores.count[m]:.2f}"]
            if d.max_sample_index:
                row.append(f"{scores.best_total[m] / scores.best_count[m]:.2f}" if scores.best_count[m] else "-")
            if len(samples) > 1:
                row += [_mean(scores.by_sample[i][m], scores.by_sample_count[i][m]) for i in samples]
            rows.append(row)
        s.blocks.append("Per-row scores in data/ (" + ", ".join(m for m in EVALUATION_COLUMNS if m in metrics) + "):")
        s.blocks.append(Table(header, rows))
        means = {i: {m: scores.by_sample[i][m] / scores.by_sample_count[i][m] for m in metrics
                     if scores.by_sample_count[i][m]} for i in samples}
        png = figures.scores_by_sample(means, metrics)
        if png:
            s.blocks.append(Figure("scores_by_sample", "Mean score per sample_index", png))
    return [s]


def _mean(total: float, count: int) -> str:
    return f"{total / count:.2f}" if count else "-"


def _repeats_and_diversity(d: OutputData) -> Section:
    s = Section("Repeats and diversity")
    if not d.sample:
        s.blocks.append("No texts sampled (--sample 0)." if d.rows else "No generated rows yet.")
        return s
    div = diversity(d.sample)
    share = "all" if len(d.sample) == d.rows else f"a random sample of {len(d.sample):,} of {d.rows:,}"
    s.blocks.append(f"Measured on {share} generated texts.")
    rows = [
        ["distinct-1", _number(div.distinct_1, 3), "distinct words / all words; higher is more varied"],
        ["distinct-2", _number(div.distinct_2, 3), "distinct word pairs / all word pairs"],
        ["self-BLEU", _number(div.self_bleu, 1),
         f"mean BLEU of each of {div.self_bleu_texts} texts against the others; lower is more varied"],
        ["empty texts", f"{div.empty:,}", "texts with no words"],
    ]
    s.blocks.append(Table(["measure", "value", "meaning"], rows))
    repeated = most_repeated(d.sample, REPEATED)
    if repeated:
        s.blocks.append("The most repeated outputs:")
        s.blocks.append(Table(["times", "share", "text"], [[f"{n:,}", f"{n / len(d.sample):.1%}", _clip(t) or "(empty)"]
                                                           for t, n in repeated]))
    else:
        s.blocks.append("No output occurs twice.")
    return s


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row_key(row: dict) -> str:
    first = next(iter(row.values()), None)  # every output file starts with the row id
    return f"{first}, {row.get('sample_index')}"


def _clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"
