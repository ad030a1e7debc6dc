"""C0 of issue 20: can bulkgen[vllm] reach 1.2x vLLM offline on augment at all?

    python -m bench.vllm_offline --augment-matrix [--smoke] [--rows N] [--threads T]

vLLM offline on the augment workload, one child process after another from this
one, each the same requests with one thing changed:
(a) arrival order, prefix cache on (vLLM's default: the target's baseline);
(b) arrival order, prefix cache off (what the cache is worth);
(c) rows sorted by template (what admitting a prefix's rows together could add);
(d) two processes of one thread, each on half the rows in arrival order, started
    together (bulkgen[vllm]'s 2x1t layout without bulkgen: the layout's share);
(e) as (d), each process on its own templates (a grouped plan with replica
    affinity, C5, at its best).
Tokens/s of the generate call(s) and the prefix-cache hit rate
(sum of num_cached_tokens / prompt tokens), each as a ratio to (a).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from bench.baselines import Result, _eos
from bench.run import prepare_model, vllm_settings
from bench.presets import CPU, Preset, smoke
from bench.model import load_model
from bench.vllm_offline import hit_rate, run_vllm_offline, run_vllm_offline_split
from bench.workloads import Workload, augment

HERE = Path(__file__).resolve().parent


def halves(wl: Workload) -> list[list[int]]:
    """Arrival order cut into two halves, as two replicas would take contiguous shards."""
    mid = wl.rows // 2
    return [list(range(mid)), list(range(mid, wl.rows))]


def by_template(wl: Workload, parts: int = 2) -> list[list[int]]:
    """Each part the rows of its own templates (template t goes to part t mod parts), arrival order within."""
    return [[i for i in range(wl.rows) if wl.templates[i] % parts == k] for k in range(parts)]


def matrix(
    preset: Preset, wl: Workload, model_dir: Path, work: Path, tokenizer, eos: set[int], threads: int, say=print,
    only: str = "abcde",
) -> list[Result]:  # fmt: skip
    """Runs (a)-(e) (those in `only`) one after the other; their Results, each named in its notes."""
    base = vllm_settings(preset, wl, threads)
    one = dataclasses.replace(base, threads=1)
    no_cache = dataclasses.replace(base, options={**base.options, "enable_prefix_caching": False})
    runs = [
        ("(a) arrival order, cache on", lambda: run_vllm_offline(wl, model_dir, work, base, tokenizer, eos, tag="c0-a")),
        (
            "(b) arrival order, cache off",
            lambda: run_vllm_offline(wl, model_dir, work, no_cache, tokenizer, eos, tag="c0-b"),
        ),
        (
            "(c) sorted by template",
            lambda: run_vllm_offline(
                wl, model_dir, work, dataclasses.replace(base, by_template=True), tokenizer, eos, tag="c0-c"
            ),
        ),
        (
            "(d) 2 processes x 1 thread, halves",
            lambda: run_vllm_offline_split(wl, halves(wl), model_dir, work, one, tokenizer, eos, tag="c0-d"),
        ),
        (
            "(e) 2 processes x 1 thread, by template",
            lambda: run_vllm_offline_split(wl, by_template(wl), model_dir, work, one, tokenizer, eos, tag="c0-e"),
        ),
    ]
    results = []
    for name, run in runs:
        if name[1] not in only:
            continue
        r = run()
        r.notes = name
        r.extra["load"] = os.getloadavg()[0]
        results.append(r)
        say(f"   {name:<42} {r.completion_tokens:>7} tok {r.seconds:7.1f}s {r.tokens_per_s:8.1f} tok/s "
            f"hit rate {hit_rate(r):.1%}  load {r.extra['load']:.1f}")  # fmt: skip
    return results


def render(wl: Workload, results: list[Result], threads: int) -> str:
    """The matrix as a table; ratios to the first run ((a) unless --runs left it out)."""
    a = results[0]
    lines = [
        f"augment: {wl.describe()}; {len({*wl.templates})} templates; a cache that never evicts could skip "
        f"{wl.shared_prefix_tokens() / sum(len(p) for p in wl.prompt_ids):.1%} of the prompt tokens",
        f"(a)-(c): one engine, {threads} OMP thread(s); (d), (e): two engines of 1 thread each",
        "",
        f"| run | tokens/s | vs {a.notes[:3]} | hit rate | seconds | same text as {a.notes[:3]} | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        same = sum(1 for k, t in r.extra["texts"].items() if a.extra["texts"].get(k) == t)
        lines.append(
            f"| {r.notes} | {r.tokens_per_s:,.1f} | {r.tokens_per_s / a.tokens_per_s:.2f}x | {hit_rate(r):.1%} | "
            f"{r.seconds:.1f} | {same}/{len(r.extra['texts'])} | {r.extra['load']:.1f} |"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vllm_offline --augment-matrix", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model and workload: checks the code path only")
    parser.add_argument("--rows", type=int, help="augment rows (default: the preset's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of (a)-(c)")
    parser.add_argument("--runs", default="abcde", help="which of (a)-(e) to run, e.g. ad (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preset = smoke(CPU) if args.smoke else CPU
    rows, templates, prefix, new = preset.augment
    model_dir = prepare_model(preset, args.out)
    model, tokenizer = load_model(model_dir)
    wl = augment(tokenizer, args.rows or rows, templates, prefix, new)
    work = args.out / f"c0-{preset.name}"
    print(f"C0 matrix on {wl.describe()}", flush=True)
    eos = _eos(model, tokenizer)
    results = matrix(preset, wl, model_dir, work, tokenizer, eos, args.threads, _say, args.runs)
    print("\n" + render(wl, results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
