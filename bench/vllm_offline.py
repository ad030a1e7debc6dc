"""(e) vLLM offline: `vllm.LLM.generate` on the workload's token ids, in a process of its own.

The requests are the ones a bulkgen replica builds (workers/vllm_engine.py): one per
(row, sample index), TokensPrompt of the same token ids, SamplingParams with the row's
own max_tokens, greedy as temperature 0, and the sequence's own seed
(jobs.core.protocol.row_seed of the job seed, the row's id and the sample index). The
engine's settings are the ones bulkgen's engine gets: max_num_seqs and
max_num_batched_tokens from the replica's batch sizes, the KV cache bulkgen's engine
sizes from that token budget (CPU), and the preset's vllm_options. The admission
order is vLLM's default, arrival order, unless `longest_first` asks for the order
bulkgen's engine uses, or `by_template` sorts an augment workload's rows by template
(a reference: what grouping rows by prefix could give). Every run reports its
prefix-cache hits: the sum of `RequestOutput.num_cached_tokens` over the prompt tokens,
the definition bulkgen's vLLM engine uses for its `cached_prompt_tokens` counter.

A fresh process (`python -m bench.vllm_offline IN.json OUT.json`): vLLM reads its
settings from the environment before it starts, and its CPU backend takes over the
process's threads (it replaces torch.set_num_threads), which the in-process baselines
must not inherit. Timed: `LLM(...)` and a one-token warm-up (what bulkgen's engine does
before it reports ready: start-up), then one `llm.generate` of every request (steady state).
`run_vllm_offline_split` runs several such processes side by side, each on its own rows,
started together once all are warm: vLLM offline laid out as bulkgen's replicas are.
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
    by_template: bool = False  # rows sorted by template (augment), arrival order within one

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
        order = ", longest first" if self.longest_first else ", by template" if self.by_template else ""
        cache = ", no prefix cache" if self.options.get("enable_prefix_caching") is False else ""
        return f"vLLM offline{threads} b={self.max_num_seqs}{order}{cache}"


def kv_cache_bytes(shape: ModelShape, dtype: str, tokens: int) -> int:
    """The KV cache bulkgen's vLLM engine sizes on CPU for the same token budget."""
    from workers.vllm_engine import kv_cache_bytes as sized

    return sized(shape.layers, shape.kv_heads, shape.head_dim, dtype, tokens, shape.max_positions)


def requests(wl: Workload, job_seed: int = 0, rows: list[int] | None = None) -> list[dict]:
    """One request per (row, sample index), as a bulkgen replica builds them; `rows`: only
    these rows, in this order (default: every row in arrival order)."""
    from jobs.core.protocol import row_seed

    rows = range(wl.rows) if rows is None else rows
    return [
        {
            "row": i,
            "sample": s,
            "prompt_ids": list(wl.prompt_ids[i]),
            "max_tokens": wl.limits[i],
            "seed": row_seed(job_seed, wl.row_id(i), s),
        }
        for i in rows
        for s in range(wl.num_return_sequences)
    ]


def row_order(wl: Workload, settings: VllmSettings) -> list[int]:
    """The rows in the order the requests are handed to vLLM."""
    if settings.by_template:
        if wl.templates is None:
            raise ValueError(f"workload {wl.name} has no templates to sort by")
        return sorted(range(wl.rows), key=lambda i: (wl.templates[i], i))
    return list(range(wl.rows))


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


@dataclass
class _Child:
    """One vLLM offline process, launched and not yet collected."""

    proc: subprocess.Popen
    requests: list[dict]
    out: Path
    log: Path
    started: float  # time.time() at launch
    ready: int | None = None  # read end of the pipe the child writes to once warm (split runs)


def _launch(
    wl: Workload, rows: list[int], model_dir: Path, work_dir: Path, settings: VllmSettings, eos: set[int], tag: str,
    barrier: bool = False,
) -> _Child:  # fmt: skip
    where = work_dir / "vllm-offline"
    where.mkdir(parents=True, exist_ok=True)
    job, out, log = where / f"{tag}.json", where / f"{tag}.out.json", where / f"{tag}.log"
    out.unlink(missing_ok=True)
    reqs = requests(wl, rows=rows)
    ready_r = ready_w = None
    if barrier:
        ready_r, ready_w = os.pipe()
    job.write_text(
        json.dumps(
            {
                "model": str(model_dir),
                "engine_args": settings.engine_args(),
                "do_sample": wl.do_sample,
                "longest_first": settings.longest_first,
                "eos": sorted(eos),
                "requests": reqs,
                "ready_fd": ready_w,
            }
        )
    )
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.vllm_offline", str(job), str(out)],
            env=environment(settings),
            stdin=subprocess.PIPE if barrier else subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            pass_fds=(ready_w,) if barrier else (),
        )
    if barrier:
        os.close(ready_w)
    return _Child(proc, reqs, out, log, started, ready_r)


def _collect(child: _Child, timeout: float) -> dict:
    """Wait for the child; its output (token ids, times, cached tokens), or RuntimeError."""
    try:
        code = child.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
        raise
    if code != 0 or not child.out.exists():
        tail = child.log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit status {code}: " + " / ".join(tail))
    return json.loads(child.out.read_text())


def _result(
    wl: Workload, settings: VllmSettings, children: list[_Child], outputs: list[dict], tokenizer, eos: set[int],
    seconds: float, end_to_end: float, startup: float,
) -> Result:  # fmt: skip
    tokens = cached = prompt = 0
    texts = {}
    for child, res in zip(children, outputs):
        cached += res["cached_tokens"]
        prompt += res["prompt_tokens"]
        for r, ids in zip(child.requests, res["token_ids"]):
            useful = _useful(ids, r["max_tokens"], eos)
            tokens += useful
            texts[(wl.row_id(r["row"]), r["sample"])] = tokenizer.decode(ids[:useful], skip_special_tokens=True)
    label = settings.label()
    if len(children) > 1:
        label = label.replace("vLLM offline", f"vLLM offline {len(children)}x", 1)
    return Result(
        label,
        wl.name,
        tokens,
        seconds,
        end_to_end_seconds=end_to_end,
        extra={
            "threads": settings.threads if settings.device == "cpu" else "-",
            "vllm": {
                "version": outputs[0]["version"],
                "startup_s": startup,
                "engine_args": settings.engine_args(),
                "longest_first": settings.longest_first,
                "by_template": settings.by_template,
                "processes": len(children),
                "cached_tokens": cached,
                "prompt_tokens": prompt,
            },
            "texts": texts,
        },
    )


def run_vllm_offline(
    wl: Workload, model_dir: Path, work_dir: Path, settings: VllmSettings, tokenizer, eos: set[int],
    timeout: float = 1200, tag: str | None = None,
) -> Result:  # fmt: skip
    """Run the workload through vllm.LLM.generate in a fresh process; raises RuntimeError if it fails."""
    child = _launch(wl, row_order(wl, settings), model_dir, work_dir, settings, eos, tag or wl.name)
    res = _collect(child, timeout)
    return _result(
        wl, settings, [child], [res], tokenizer, eos,
        seconds=res["generate_s"], end_to_end=res["generate_end"] - child.started, startup=res["ready"] - child.started,
    )  # fmt: skip


def run_vllm_offline_split(
    wl: Workload, parts: list[list[int]], model_dir: Path, work_dir: Path, settings: VllmSettings, tokenizer,
    eos: set[int], timeout: float = 1200, tag: str | None = None,
) -> Result:  # fmt: skip
    """One vLLM offline process per part (its rows, in that order), side by side, each with
    `settings` (threads each). They generate only once every one is warm, so the steady state
    is from that moment to the last one's end: how fast the layout runs, not whose start won."""
    tag = tag or f"{wl.name}-split"
    children = [
        _launch(wl, rows, model_dir, work_dir, settings, eos, f"{tag}-{k}", barrier=True)
        for k, rows in enumerate(parts)
    ]
    try:
        for child in children:
            if os.read(child.ready, 1) != b"1":  # EOF: it died before warming up
                raise RuntimeError(f"a vLLM offline process exited before it was ready; see {child.log}")
        go = time.time()
        for child in children:
            child.proc.stdin.write(b"go\n")
            child.proc.stdin.close()
        outputs = [_collect(child, timeout) for child in children]
    finally:
        for child in children:
            os.close(child.ready)
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
    started = min(c.started for c in children)
    end = max(res["generate_end"] for res in outputs)
    return _result(
        wl, settings, children, outputs, tokenizer, eos,
        seconds=end - go, end_to_end=end - started, startup=go - started,
    )  # fmt: skip


def in_arrival_order(r: Result) -> bool:
    """A completed (e) run in arrival order, one process with the prefix cache on, as LLM.generate runs
    by default: what the targets compare with."""
    v = r.extra.get("vllm")
    return (
        v is not None
        and not v["longest_first"]
        and not v.get("by_template")
        and v.get("processes", 1) == 1
        and v["engine_args"].get("enable_prefix_caching") is not False
        and bool(r.completion_tokens)
    )


def hit_rate(r: Result) -> float | None:
    """Prefix-cache hits of a vLLM offline run: cached prompt tokens / prompt tokens."""
    v = r.extra.get("vllm", {})
    return v["cached_tokens"] / v["prompt_tokens"] if v.get("prompt_tokens") else None


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
    if job["ready_fd"] is not None:  # a split run: say so, and start when all are warm
        os.write(job["ready_fd"], b"1")
        os.close(job["ready_fd"])
        sys.stdin.readline()
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
                # Filled whether log stats are on or off (see workers/vllm_engine.py).
                "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            }
        )
    )
    return 0


if __name__ == "__main__":  # vLLM starts its processes by spawn: they import this module
    if sys.argv[1:2] == ["--augment-matrix"]:
        from bench.prefix_matrix import main as matrix

        sys.exit(matrix(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
