"""CPU seconds of start-up, step by step: `python -m bench.startup_cpu [JOB_YAML]`.

Wall time on a shared 2-core machine says more about the neighbours than about
bulkgen, so this counts the CPU each step takes (user + system, every thread),
each side in a fresh interpreter, one step after the other:

    driver   the `bulkgen run` process up to dispatch: imports, the spec, the
             checks as `run` makes them on a local Ray (and, as `validate` makes
             them, the meta model and the tokenizer), the weights' hash, the
             replica's class (which it wraps with ray.remote)
    replica  one replica as a Ray worker runs it: imports, the engine's load
             (tokenizer, from_pretrained), configure, then a first engine step
             (8 prompts, 1 new token)

Ray's own processes (`ray.init`) are not counted here: see the raylet's and
workers' /proc/<pid>/stat, or docs/design/faster-start-and-full-batches.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEMO = "examples/demo/job.yaml"


def cpu() -> float:
    t = os.times()
    return t.user + t.system


class Steps:
    def __init__(self):
        self.last, self.rows = cpu(), [("interpreter", cpu())]

    def done(self, name: str) -> None:
        now = cpu()
        self.rows.append((name, now - self.last))
        self.last = now

    def print(self, side: str) -> None:
        for name, seconds in self.rows:
            print(f"{side:8s} {name:40s} {seconds:6.2f}")
        print(f"{side:8s} {'total':40s} {self.last:6.2f}")


def driver(job: str) -> None:
    steps = Steps()
    import jobs.cli  # noqa: F401 (the CLI's own imports)
    import jobs.driver  # noqa: F401

    steps.done("import jobs.cli, jobs.driver")
    from jobs import preflight
    from jobs.core.model import load_tokenizer
    from jobs.core.spec import load_spec
    from jobs.validate import check_before_launch, check_input_and_model, replicas_check_the_model

    spec = load_spec(job)
    steps.done("load_spec")
    check_before_launch(spec)
    check_input_and_model(spec, replicas_check_model=replicas_check_the_model(spec, None))
    steps.done("checks as run makes them (local Ray)")
    from workers.replica import Replica  # noqa: F401 (ReplicaPool wraps it with ray.remote)

    steps.done("import workers.replica (to launch it)")
    preflight.check_model_loadable(spec)
    steps.done("  + meta model (validate; imports torch)")
    load_tokenizer(spec.model)
    steps.done("  + tokenizer (validate)")
    steps.print("driver")


def replica(job: str) -> None:
    steps = Steps()
    import ray  # noqa: F401 (a Ray worker has it before it runs an actor)

    steps.done("import ray (the worker's own)")
    from workers.replica import Replica

    steps.done("import workers.replica")
    import transformers.models.auto.modeling_auto  # noqa: F401

    steps.done("import transformers' model classes")
    from jobs.core.spec import load_spec

    spec = load_spec(job)
    replica = Replica(spec)
    steps.done("engine load (tokenizer, from_pretrained)")
    replica.configure({"model": {}})
    steps.done("configure (stages)")
    from workers.engine import Request

    prompt = tuple(replica.loop.engine.tokenizer("Write a short poem about the sea")["input_ids"])
    replica.loop.generate([Request(i, prompt, seed=i, max_new_tokens=1) for i in range(8)])
    steps.done("first step (8 prompts, 1 token)")
    steps.print("replica")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.startup_cpu", description=__doc__.splitlines()[0])
    p.add_argument("job", nargs="?", default=DEMO)
    p.add_argument("--side", choices=["driver", "replica"], help="one side, in this process (default: both, each fresh)")
    args = p.parse_args(argv)
    if args.side:
        {"driver": driver, "replica": replica}[args.side](args.job)
        return
    for side in ("driver", "replica"):
        subprocess.run([sys.executable, "-m", "bench.startup_cpu", args.job, "--side", side], check=True)


if __name__ == "__main__":
    main()
