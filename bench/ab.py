"""Is a change within noise? bulkgen before and after it, alternated on one machine in one run.

    python -m bench.ab BEFORE_TREE [AFTER_TREE] [--rounds 3] [--only long-tail]

Each tree is a checkout of bulkgen (e.g. `git worktree add /tmp/before <commit>`);
AFTER_TREE defaults to this one. Every measurement is a fresh process that runs
that tree's own code: a bulkgen job on the transformers engine, configured as
`python -m bench.run` configures it (bench/run.py's bulkgen_config, 2 replicas x
1 thread), on the cpu preset's workloads and model, through bench/bulkgen_run.py. The trees run in turn, round after round,
so a machine that slows down part-way slows both. Prints each tree's median
steady-state and end-to-end tokens/s per workload, the after/before ratio, and
the spread of the rounds: a ratio inside that spread is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = ("long-tail", "uniform")

# Run inside the measured tree's own process: its bench code and its product code.
_MEASURE = """
import json, sys
from pathlib import Path
from bench.bulkgen_run import run_bulkgen
from bench.model import load_model
from bench.presets import CPU
from bench.run import bulkgen_config
from bench.workloads import long_tail, uniform
model_dir, work, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
_, tokenizer = load_model(model_dir)
wl = long_tail(tokenizer, CPU.long_tail_rows) if name == "long-tail" else uniform(tokenizer, *CPU.uniform)
r = run_bulkgen(wl, model_dir, work, bulkgen_config(CPU, wl, replicas=2, threads=1, engine="transformers"))
print("RESULT " + json.dumps({"steady": r.tokens_per_s, "end_to_end": r.end_to_end_tokens_per_s}))
"""


def measure(tree: Path, model_dir: Path, work: Path, workload: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(model_dir), str(work), workload],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{tree} on {workload} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", default=HERE.parent)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=WORKLOADS, action="append")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="scratch directory (gitignored)")
    args = parser.parse_args(argv)

    from bench.model import save_model
    from bench.presets import CPU

    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    model_dir = args.out / "model-cpu"
    if not (model_dir / "bench-shape.txt").exists() or (model_dir / "bench-shape.txt").read_text() != repr(CPU.shape):
        save_model(model_dir, CPU.shape, CPU.dtype, CPU.device)
        (model_dir / "bench-shape.txt").write_text(repr(CPU.shape))
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for workload in args.only or WORKLOADS:
            for label, tree in trees.items():
                result = measure(tree, model_dir, args.out / f"ab-{label}", workload)
                runs.setdefault((label, workload), []).append(result)
                print(f"round {round_ + 1} {workload:9} {label:6} steady {result['steady']:7.1f} tok/s, "
                      f"end to end {result['end_to_end']:7.1f} tok/s", flush=True)  # fmt: skip
    print(f"\nbefore: {trees['before']}\nafter:  {trees['after']}\nmedians of {args.rounds} rounds:")
    for workload in args.only or WORKLOADS:
        for metric in ("steady", "end_to_end"):
            before = [r[metric] for r in runs["before", workload]]
            after = [r[metric] for r in runs["after", workload]]
            spread = max((max(v) - min(v)) / statistics.median(v) for v in (before, after))
            ratio = statistics.median(after) / statistics.median(before)
            print(f"  {workload:9} {metric:10} before {statistics.median(before):7.1f}  after "
                  f"{statistics.median(after):7.1f} tok/s  after/before {ratio:.3f}  (rounds spread {spread:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
