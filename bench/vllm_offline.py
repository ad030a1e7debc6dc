"""(e) vLLM offline: `vllm.LLM.generate` on the workload's token ids, in a process of its own.

The requests are the ones a bulkgen replica builds (workers/vllm_engine.py): one per
(row, sample index), TokensPrompt of the same token ids, SamplingParams with the row's
own max_tokens, greedy as temperature 0, and the sequence's own seed
(jobs.core.protocol.row_seed of the job seed, the row's id and the sample index). The
engine's settings are the ones bulkgen's engine gets: max_num_seqs and
max_num_batched_tokens from the replica's batch sizes, the KV cache bulkgen's engine
sizes from that token budget (CPU), and the preset's vllm_options. The admission
order is vLLM's default, arrival order, unless `longest_first` asks for the order
bulkgen's engine uses.

A fresh process (`python -m bench.vllm_offline IN.json OUT.json`): vLLM reads its
settings from the environment before it starts, and its CPU backend takes over the
process's threads (it replaces torch.set_num_threads), which the in-process baselines
must not inherit. Timed: `LLM(...)` and a one-token warm-up (what bulkgen's engine does
before it reports ready: start-up), then one `llm.generate` of every request (steady state).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.baselines import Result, _useful
from bench.model import ModelShape
from bench.workloads import Workload


@dataclass(frozen=True)
class VllmSettings:
    dtype: str
    max_num_seqs: int
    max_num_batched_tokens: int
    threads: int  # OMP threads on CPU (the whole machine: one engine, as people run it)
    device: str = "cpu"
    kv_cache_memory_bytes: int | None = None  # CPU: never vLLM's default share of host memory
    options: dict = field(default_factory=dict)  # the preset's vllm_options
    # vLLM's priority scheduling, each request's priority its -max_tokens: the order
    # bulkgen's vLLM engine admits rows in (longest first) instead of arrival order.
    longest_first: bool = False

    def engine_args(self) -> dict:
        args = {
            "dtype": self.dtype,
            "seed": 0,  # bulkgen's generation.seed, which its engine passes as vLLM's seed
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "disable_log_stats": True,
        }
        if self.kv_cache_memory_bytes:
            args["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.longest_first:
            args["scheduling_policy"] = "priority"
        return {**args, **self.options}

    def label(self) -> str:
        threads = f" {self.threads}t" if self.device == "cpu" else ""
        order = ", longest first" if self.longest_first else ""
        return f"vLLM offline{threads} b={self.max_num_seqs}{order}"


def kv_cache_bytes(shape: ModelShape, dtype: str, tokens: int) -> int:
    """The KV cache bulkgen's vLLM engine sizes on CPU for the same token budget."""
    from workers.vllm_engine import kv_cache_bytes as sized

    return sized(shape.layers, shape.kv_heads, shape.head_dim, dtype, tokens, shape.max_positions)


def requests(wl: Workload, job_seed: int = 0) -> list[dict]:
    """One request per (row, sample index), as a bulkgen replica builds them."""
    from jobs.core.protocol import row_seed

    return [
        {
            "row": i,
            "sample": s,
            "prompt_ids": list(ids),
            "max_tokens": limit,
            "seed": row_seed(job_seed, wl.row_id(i), s),
        }
        for i, (ids, limit) in enumerate(zip(wl.prompt_ids, wl.limits))
        for s in range(wl.num_return_sequences)
    ]


def environment(settings: VllmSettings) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
    if settings.device == "cpu":
        # What bulkgen's replicas set on CPU: the thread count ours, no core binding,
        # the engine core in this process (no second process to feed it).
        env.update(
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            OMP_NUM_THREADS=str(settings.threads),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
        )
    return env


def run_vllm_offline(
    wl: Workload, model_dir: Path, work_dir: Path, settings: VllmSettings, tokenizer, eos: set[int],
    timeout: float = 1200,
) -> Result:  # fmt: skip
    """Run the workload through vllm.LLM.generate in a fresh process; raises RuntimeError if it fails."""
    where = work_dir / "vllm-offline"
    where.mkdir(parents=True, exist_ok=True)
    job, out, log = where / f"{wl.name}.json", where / f"{wl.name}.out.json", where / f"{wl.name}.log"
    out.unlink(missing_ok=True)
    reqs = requests(wl)
    job.write_text(
        json.dumps(
            {
                "model": str(model_dir),
                "engine_args": settings.engine_args(),
                "do_sample": wl.do_sample,
                "longest_first": settings.longest_first,
                "eos": sorted(eos),
                "requests": reqs,
            }
        )
    )
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.vllm_offline", str(job), str(out)],
            env=environment(settings),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit status {proc.returncode}: " + " / ".join(tail))
    res = json.loads(out.read_text())
    tokens = 0
    texts = {}
    for r, ids in zip(reqs, res["token_ids"]):
        useful = _useful(ids, r["max_tokens"], eos)
        tokens += useful
        texts[(wl.row_id(r["row"]), r["sample"])] = tokenizer.decode(ids[:useful], skip_special_tokens=True)
    return Result(
        settings.label(),
        wl.name,
        tokens,
        res["generate_s"],
        end_to_end_seconds=res["generate_end"] - started,
        extra={
            "threads": settings.threads if settings.device == "cpu" else "-",
            "vllm": {
                "version": res["version"],
                "startup_s": res["ready"] - started,
                "engine_args": settings.engine_args(),
                "longest_first": settings.longest_first,
            },
            "texts": texts,
        },
    )


def in_arrival_order(r: Result) -> bool:
    """A completed (e) run in arrival order, as LLM.generate runs by default: what the targets compare with."""
    return "vllm" in r.extra and not r.extra["vllm"]["longest_first"] and bool(r.completion_tokens)


def same_texts(a: dict, b: dict) -> tuple[int, int]:
    """(sequences with the same text in both, sequences in either)."""
    keys = set(a) | set(b)
    return sum(1 for k in keys if k in a and k in b and a[k] == b[k]), len(keys)


def main(argv: list[str]) -> int:
    """The child process: load, warm up, generate, write token ids and times."""
    job = json.loads(Path(argv[0]).read_text())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], tokenizer=job["model"], **job["engine_args"])
    # One token, as bulkgen's engine generates before its replica reports ready (its probe).
    llm.generate([TokensPrompt(prompt_token_ids=[job["eos"][0]])], SamplingParams(max_tokens=1), use_tqdm=False)
    ready = time.time()
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in job["requests"]]
    params = [
        # As workers/vllm_engine.VllmEngine._params builds them for this workload's generation spec.
        SamplingParams(
            n=1,
            max_tokens=r["max_tokens"],
            temperature=1.0 if job["do_sample"] else 0.0,
            top_p=1.0,
            top_k=0,
            repetition_penalty=1.0,
            seed=r["seed"],
            skip_special_tokens=True,
        )
        for r in job["requests"]
    ]
    order = {"priority": [-r["max_tokens"] for r in job["requests"]]} if job["longest_first"] else {}
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, **order)
    seconds = time.perf_counter() - t
    end = time.time()
    Path(argv[1]).write_text(
        json.dumps(
            {
                "version": vllm.__version__,
                "ready": ready,
                "generate_s": seconds,
                "generate_end": end,
                "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            }
        )
    )
    return 0


if __name__ == "__main__":  # vLLM starts its processes by spawn: they import this module
    sys.exit(main(sys.argv[1:]))
