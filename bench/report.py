"""The machine's description and the results table (printed, and written to RESULTS.md)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from pathlib import Path

from bench.baselines import Result
from bench.presets import Preset

REPO = Path(__file__).resolve().parent.parent

# The targets: (workload, measure, threshold).
TARGETS = [
    ("long-tail", "naive", 10.0),
    ("long-tail", "static", 1.3),
    ("uniform", "static", 0.95),
]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def environment(preset: Preset) -> dict:
    import ray
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if preset.device.startswith("cuda") else None
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB" + (f"; {gpu}" if gpu else ""),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, ray {ray.__version__}",
        "load_start": os.getloadavg(),
    }


def header(env: dict, preset: Preset) -> str:
    p = preset.shape.params()
    total = sum(p.values())
    return (
        f"bulkgen benchmark, preset {preset.name}: {env['date']}, commit {env['commit']}\n"
        f"machine: {env['machine']}\n{env['versions']}\n"
        f"model: Llama, random weights, {preset.dtype} on {preset.device}: {total / 1e6:,.1f}M parameters "
        f"({p['body'] / 1e6:,.1f}M body, vocab {preset.shape.vocab}, hidden {preset.shape.hidden}, "
        f"{preset.shape.layers} layers)\n"
        f"load average at start: {' / '.join(f'{x:.1f}' for x in env['load_start'])} (1/5/15 min)"
    )


def command(preset: Preset) -> str:
    base, _, smoke = preset.name.partition("-")
    return "python -m bench.run" + ("" if base == "cpu" else f" --preset {base}") + (" --smoke" if smoke else "")


def calibration_note(calibration: dict[int, float]) -> str:
    if not calibration:
        return ""
    runs = sorted(calibration.items(), reverse=True)
    timings = ", ".join(f"{t} thread{'s' if t > 1 else ''} {s:.2f}s" for t, s in runs)
    return f" (a short generate: {timings})"


def _best_static(results: list[Result]) -> Result | None:
    static = [r for r in results if r.system.startswith("static") and r.completion_tokens]
    return max(static, key=lambda r: r.tokens_per_s) if static else None


def _bulkgen(results: list[Result]) -> Result | None:
    """The fastest bulkgen run (on long-tail, the faster replica layout)."""
    runs = [r for r in results if "config" in r.extra]
    return max(runs, key=lambda r: r.tokens_per_s) if runs else None


def _threads(r: Result) -> str:
    if "config" in r.extra:
        return f"{r.extra['config'].replicas} x {r.extra['config'].torch_threads}"
    return str(r.extra.get("threads", "-"))


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _table(results: list[Result], peak: float) -> list[str]:
    naive = next((r for r in results if r.system == "naive"), None)
    best = _best_static(results)
    rows = [
        "| system | new tokens | seconds | tokens/s | vs (a) naive | vs best (b) | padding waste | MFU "
        "| threads | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.completion_tokens:
            rows.append(f"| {r.system} | - | - | - | - | - | - | - | - | {r.notes} |")
            continue
        variants = [(r.system, r.seconds)]
        if r.end_to_end_seconds:
            variants = [(f"{r.system}, steady state", r.seconds), (f"{r.system}, with start-up", r.end_to_end_seconds)]
        for label, seconds in variants:
            rate = r.completion_tokens / seconds
            if r is best:
                label = f"**{label}** (best b)"
            waste = f"{r.padding_waste:.1%}" if r.padding_waste is not None else "-"
            mfu = r.extra["flops"] / seconds / peak
            rows.append(
                f"| {label} | {r.completion_tokens:,} | {seconds:.1f} | {rate:,.1f} | "
                f"{_ratio(rate, naive.tokens_per_s if naive else None)} | "
                f"{_ratio(rate, best.tokens_per_s if best else None)} | {waste} | {mfu:.2%} | {_threads(r)} | "
                f"{r.extra.get('load', 0):.1f} |"
            )
    return rows


def render(
    env: dict, preset: Preset, results: dict[str, list[Result]], peak: float, scale: dict, elapsed: float
) -> str:
    load_end = os.getloadavg()
    lines = [
        f"# bulkgen benchmark results ({preset.name} preset)",
        "",
        f"Written by `{command(preset)}`; see bench/README.md.",
        "",
        "```",
        header(env, preset),
        f"load average at end:   {' / '.join(f'{x:.1f}' for x in load_end)}",
        f"matmul peak: {peak / 1e9:,.1f} GFLOP/s ({preset.dtype}, {preset.peak_matmul}^3, all cores, best of this run)",
        f"benchmark wall time: {elapsed / 60:.1f} min",
        "```",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    for workload, against, threshold in TARGETS:
        rs = results.get(workload, [])
        naive = next((r for r in rs if r.system == "naive"), None)
        base = naive if against == "naive" else _best_static(rs)
        what = "naive (a)" if against == "naive" else f"best batched (b, {base.system if base else '-'})"
        b = _bulkgen(rs)
        if b is None or base is None:
            continue
        ratio = b.tokens_per_s / base.tokens_per_s
        verdict = "yes" if ratio >= threshold else f"**no** ({ratio / threshold - 1:+.0%} of target)"
        lines.append(f"| {workload}: bulkgen steady state >= {threshold}x {what} | {ratio:.2f}x | {verdict} |")
    lt = results.get("long-tail", [])
    naive = next((r for r in lt if r.system == "naive"), None)
    if naive and naive.completion_tokens:
        mfu = naive.extra["flops"] / naive.seconds / peak
        best = max(
            (r for rs in results.values() for r in rs if r.completion_tokens),
            key=lambda r: r.extra["flops"] / r.seconds,
        )
        lines += [
            "",
            f"On long-tail the naive loop already runs at {mfu:.1%} MFU: its prefills are batches of a whole prompt. "
            f"No system can beat it by more than {1 / mfu:.1f}x on this machine (100% MFU); 10x needs "
            f"{10 * mfu:.0%} MFU. The best any system reached in this run is "
            f"{best.extra['flops'] / best.seconds / peak:.0%} ({best.system}, {best.workload}).",
        ]
    lines += ["", "## Results", ""]
    for name, rs in results.items():
        lines += [f"### {name}", "", *_table(rs, peak), ""]
        for r in rs:
            if r.notes:
                lines.append(f"- {r.system}: {r.notes}")
            if "engine" in r.extra:
                e, cfg = r.extra["engine"], r.extra["config"]
                lines.append(
                    f"- {r.system}: {cfg.replicas} replica(s) x {cfg.torch_threads} torch thread(s), batch_size "
                    f"{cfg.batch_size}, max_batch_tokens {cfg.max_batch_tokens}, rows_per_shard {cfg.rows_per_shard}; "
                    f"engine: {e.get('steps', 0)} decode steps, {e.get('forward_tokens', 0):,} token positions "
                    f"({e.get('padded_tokens', 0):,} with padding), {e.get('mean_decode_batch', 0):.1f} sequences per "
                    f"decode step on average; replicas' engines went idle at "
                    + ", ".join(f"{t:.1f}" for t in e.get("idle_at", []))
                    + f" s of the {r.seconds:.1f} s steady state"
                )
        lines.append("")
    lt = [r for r in results.get("long-tail", []) if "config" in r.extra]
    if len(lt) > 1:
        lines += ["## One replica with all the threads, or one replica per core? (long-tail)", ""]
        for r in lt:
            lines.append(
                f"- {r.system}: {r.tokens_per_s:,.1f} tokens/s steady state, "
                f"{r.completion_tokens / r.end_to_end_seconds:,.1f} with start-up"
            )
        best = max(lt, key=lambda r: r.tokens_per_s)
        other = min(lt, key=lambda r: r.tokens_per_s)
        lines += ["", f"Answer: **{best.system}**, {best.tokens_per_s / other.tokens_per_s:.2f}x the other.", ""]
    lines += [
        "## Driver scale: planning 10 million rows",
        "",
        f"{scale['rows']:,} rows in {scale['files']:,} Parquet files (local temp dir, footers only) through "
        f"`jobs.dataset.open_dataset` + `jobs.core.plan.plan` (rows_per_shard {scale['rows_per_shard']:,}) -> "
        f"{scale['shards']:,} shards: **{scale['wall_s']:.2f} s** wall ({scale['open_dataset_s']:.2f} s listing and "
        f"footers, {scale['plan_s']:.3f} s planning), **peak RSS +{scale['peak_rss_increase_mib']:.1f} MiB** over "
        f"{scale['rss_before_mib']:.0f} MiB (Python heap peak {scale['python_heap_peak_mib']:.1f} MiB). "
        f"Measured in a fresh process; writing the files took {scale['write_s']:.1f} s.",
        "",
        "## How to read this",
        "",
        "- Every system generates the same prompts (same text, same token ids) with the same per-row new-token",
        "  limits and stops at the end-of-text token; tokens counted are new tokens within each row's limit.",
        "- (a), (b) and (d) run in the benchmark process on all cores or on one torch thread, whichever a short",
        "  generate (one prompt for (a), 16 for (b) and (d)) ran faster just before the workload: their best,",
        "  on a machine that may be shared. threads: torch threads (bulkgen: replicas x threads each).",
        "- (b) sorts prompts by length, left-pads, and generates each batch to its largest row limit, then cuts",
        "  every row to its own limit: what a static batch costs when answers vary. Batch sizes count sequences.",
        "- (c) steady state: completion tokens / (job finished - first replica ready), from the job record;",
        "  with start-up: from just before `ray.init` to the job's end (Ray, validation, model load included).",
        "- Padding waste: share of the token positions pushed through the model that were padding or past a",
        "  row's limit (prefill + decode; attention over padded cache columns is not counted). bulkgen's comes",
        "  from its engine's counters, which each replica reports with its shard results and the job record keeps.",
        "- MFU: model FLOPs the workload needs (2 x body parameters per token position, plus attention",
        "  2 x layers x context x hidden, plus the lm_head where a token is picked; prompts counted once per",
        "  returned sequence) / seconds / the matmul peak measured in this run.",
        "- load: the machine's 1-minute load average when the measurement ended. Above the core count, other",
        "  processes were competing, and multi-threaded runs suffer most from it.",
    ]
    return "\n".join(lines) + "\n"
