"""Run the benchmark: `python -m bench.run` (2-core CPU) or `python -m bench.run --preset gpu`.

Side by side, in this process tree, on the same prompts and the same model:
(a) one prompt at a time through `model.generate`, (b) length-sorted static
batches through `model.generate` at a few batch sizes, (c) bulkgen end to end
through a Ray started here, (d) transformers' continuous batching. Prints
tokens/s, ratios to (a) and to the best (b), padding waste and model FLOPs
utilisation, and writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from bench import report
from bench.baselines import Result, hf_continuous_batching, naive, static_batches
from bench.bulkgen_run import BulkgenConfig, run_bulkgen
from bench.driver_scale import run as driver_scale
from bench.flops import matmul_peak, sequence_flops
from bench.model import load_model, save_model
from bench.presets import PRESETS, Preset, smoke
from bench.workloads import Workload, long_tail, sampling, uniform

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


def subset(wl: Workload, every: int) -> Workload:
    """Every k-th row: the same length mix, for the one-prompt-at-a-time loop on big presets."""
    if every <= 1:
        return wl
    return Workload(
        wl.name, wl.texts[::every], wl.prompt_ids[::every], wl.limits[::every], wl.do_sample, wl.num_return_sequences
    )


def bulkgen_config(preset: Preset, wl: Workload, replicas: int, threads: int) -> BulkgenConfig:
    """Shards small enough that every replica gets several (balance), two in flight
    fill its engine; the token budget is the workload's widest batch, so on
    these sizes it never binds (the engine's batch is bounded by rows)."""
    seqs = preset.bulkgen_sequences
    n = wl.num_return_sequences
    rows_per_shard = max(1, min(math.ceil(seqs / (2 * n)), math.ceil(wl.rows / (2 * replicas))))
    longest = max(len(p) + limit for p, limit in zip(wl.prompt_ids, wl.limits))
    return BulkgenConfig(
        replicas=replicas,
        torch_threads=threads,
        batch_size=seqs,
        max_batch_tokens=seqs * longest,
        rows_per_shard=rows_per_shard,
        num_gpus=1 if preset.device.startswith("cuda") else 0,
        dtype=preset.dtype,
    )


def run_workload(
    preset: Preset, wl: Workload, model, tokenizer, model_dir: Path, work: Path, layouts, sync
) -> list[Result]:
    say(f"\n== {wl.name}: {wl.describe()}")
    results: list[Result] = []

    def record(r: Result) -> Result:
        r.extra.setdefault("load", os.getloadavg()[0])
        results.append(r)
        e2e = f", end to end {r.end_to_end_seconds:.1f}s" if r.end_to_end_seconds else ""
        say(f"   {r.system:<34} {r.completion_tokens:>7} tok  {r.seconds:7.1f}s  {r.tokens_per_s:8.1f} tok/s{e2e}")
        return r

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
    except Exception as e:  # report it and go on: (d) is "where it runs"
        say(f"   transformers continuous batching failed: {type(e).__name__}: {e}")
        results.append(Result("transformers CB", wl.name, 0, math.nan, notes=f"failed: {type(e).__name__}: {e}"))
    if preset.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the replica needs the memory the baselines' batches left cached
    for replicas, threads in layouts:
        record(run_bulkgen(wl, model_dir, work, bulkgen_config(preset, wl, replicas, threads)))
    for r in results:
        r.extra.setdefault("flops", workload_flops(preset, wl))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model and workloads: checks the code paths only")
    parser.add_argument("--device", help="override the preset's device (e.g. cuda:1)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="scratch directory (gitignored)")
    parser.add_argument(
        "--only", action="append", help="run only this workload (long-tail, uniform, sampling); repeatable"
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
    workloads = [
        long_tail(tokenizer, preset.long_tail_rows),
        uniform(tokenizer, u_rows, u_prompt, u_new),
        sampling(tokenizer, s_rows, s_prompt, s_new, s_n),
    ]
    if args.only:
        workloads = [w for w in workloads if any(w.name.startswith(o) for o in args.only)]
    all_results: dict[str, list[Result]] = {}
    layouts = preset.bulkgen_layouts
    for wl in workloads:
        all_results[wl.name] = run_workload(preset, wl, model, tokenizer, model_dir, work, layouts, sync)
        if wl.name == "long-tail" and len(layouts) > 1:
            # The measured answer to "one replica with all threads or one replica per core"
            # picks the layout the other workloads run with.
            best = max((r for r in all_results[wl.name] if "config" in r.extra), key=lambda r: r.tokens_per_s)
            cfg = best.extra["config"]
            layouts = ((cfg.replicas, cfg.torch_threads),)
            say(f"   -> {cfg.replicas} replica(s) x {cfg.torch_threads} thread(s) is faster; the rest use it")
    peak = max(peak, machine_peak(preset))
    elapsed = time.perf_counter() - started
    text = report.render(env, preset, all_results, peak, scale, elapsed)
    say("\n" + text)
    results_path.write_text(text)
    say(f"\nwrote {results_path} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
