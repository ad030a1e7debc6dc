"""The loops people write by hand, and transformers' own continuous batching.

Each returns a Result: tokens generated (cut at each row's limit and at the
end-of-text token), wall seconds, and the token positions it pushed through
the model (prefill + decode, padding included) against the ones it needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from bench.workloads import Workload

log = logging.getLogger(__name__)


@dataclass
class Result:
    system: str
    workload: str
    completion_tokens: int
    seconds: float  # steady state: model loaded, cluster up
    computed_positions: int | None = None  # token positions through the model, padding included
    needed_positions: int | None = None  # the same without padding or tokens past a row's limit
    end_to_end_seconds: float | None = None  # bulkgen: with cluster and replica start-up
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def end_to_end_tokens_per_s(self) -> float:
        return self.completion_tokens / self.end_to_end_seconds

    @property
    def padding_waste(self) -> float | None:
        if not self.computed_positions:
            return None
        return 1 - self.needed_positions / self.computed_positions


def _fed(prompt_len: int, useful: int, limit: int) -> int:
    """Token positions a sequence needs fed through the model: its prompt, then every new token
    but the last (a row that ended on the end-of-text token feeds all its useful ones)."""
    return prompt_len + min(useful, limit - 1)


def _useful(tokens: list[int], limit: int, eos: set[int]) -> int:
    """New tokens that count: up to the row's limit, cut before the end-of-text token."""
    for i, t in enumerate(tokens[:limit]):
        if t in eos:
            return i
    return min(len(tokens), limit)


def _eos(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _gen_kwargs(wl: Workload, tokenizer) -> dict:
    kwargs = dict(do_sample=wl.do_sample, pad_token_id=tokenizer.pad_token_id)
    if wl.do_sample:
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=wl.num_return_sequences)
    return kwargs


def naive(model, tokenizer, wl: Workload, sync=lambda: None) -> Result:
    """(a) One prompt at a time, `model.generate` with the row's own limit."""
    import torch

    eos = _eos(model, tokenizer)
    tokens = computed = needed = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for ids, limit in zip(wl.prompt_ids, wl.limits):
            x = torch.tensor([ids], device=model.device)
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=limit, **_gen_kwargs(wl, tokenizer)
            )
            for row in out[:, len(ids) :].tolist():
                useful = _useful(row, limit, eos)
                tokens += useful
                needed += _fed(len(ids), useful, limit)
            # (n, prompt + new): samples that ended early are padded until all have
            computed += out.shape[0] * (out.shape[1] - 1)
    sync()
    return Result("naive", wl.name, tokens, time.perf_counter() - started, computed, needed)


def static_batches(model, tokenizer, wl: Workload, batch_size: int, sync=lambda: None) -> Result:
    """(b) Length-sorted, left-padded static batches through `model.generate`.

    A batch generates to its largest row limit (generate has one max_new_tokens
    and runs until every row ends), then each row is cut to its own limit: the
    real cost of static batching."""
    import torch

    eos = _eos(model, tokenizer)
    pad = tokenizer.pad_token_id
    order = sorted(range(wl.rows), key=lambda i: len(wl.prompt_ids[i]))
    tokens = computed = needed = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for at in range(0, len(order), batch_size):
            rows = order[at : at + batch_size]
            width = max(len(wl.prompt_ids[i]) for i in rows)
            # (B, T) left-padded so the last column is every row's newest token.
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids = wl.prompt_ids[i]
                x[r, width - len(ids) :] = torch.tensor(ids)
                mask[r, width - len(ids) :] = 1
            limit = max(wl.limits[i] for i in rows)
            out = model.generate(
                x.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=limit,
                **_gen_kwargs(wl, tokenizer),
            )
            new = out[:, width:].tolist()
            n = wl.num_return_sequences  # generate puts a row's samples next to each other
            for r, i in enumerate(rows):
                for s in range(n):
                    useful = _useful(new[r * n + s], wl.limits[i], eos)
                    tokens += useful
                    needed += _fed(len(wl.prompt_ids[i]), useful, wl.limits[i])
            computed += out.shape[0] * (out.shape[1] - 1)
    sync()
    return Result(f"static b={batch_size}", wl.name, tokens, time.perf_counter() - started, computed, needed)


def hf_continuous_batching(
    model, tokenizer, wl: Workload, max_requests: int, batch_tokens: int, sync=lambda: None
) -> Result:
    """(d) transformers' continuous batching (`generate_batch`'s manager), each
    request with its row's limit.

    Its cache is sized explicitly: enough pages for `max_requests` of the
    workload's longest sequences, not the default (a share of free memory,
    which on CPU took gigabytes for a small model)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    eos = _eos(model, tokenizer)
    page = 64
    longest = max(len(p) + limit for p, limit in zip(wl.prompt_ids, wl.limits))
    pages_per_request = -(-longest // page)
    cb = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=max_requests * pages_per_request,
        max_batch_tokens=max(batch_tokens, longest),
        max_requests_per_batch=max_requests,
        allow_block_sharing=False,
        seed=0,
    )
    gen = GenerationConfig(
        max_new_tokens=wl.max_new_tokens,
        eos_token_id=sorted(eos),
        pad_token_id=tokenizer.pad_token_id,
        **({"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if wl.do_sample else {"do_sample": False}),
        num_return_sequences=wl.num_return_sequences,
    )
    # transformers logs per-call chatter (no psutil on CPU, cache sizing); keep the report clean.
    cb_log = logging.getLogger("ContinuousBatchingLogger")
    level = cb_log.level
    cb_log.setLevel(logging.CRITICAL)
    limits: dict[str, tuple[int, int]] = {}  # request id -> (prompt tokens, new-token limit)
    results = {}
    try:
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        manager.warmup()  # CUDA graph capture, where used: set-up, not throughput
        sync()
        started = time.perf_counter()
        manager.start()
        try:
            for i, (ids, limit) in enumerate(zip(wl.prompt_ids, wl.limits)):
                rid = manager.add_request(list(ids), request_id=f"r{i}", max_new_tokens=limit)
                limits[rid] = (len(ids), limit)
                for c in range(wl.num_return_sequences - 1):
                    limits[f"{rid}__child#{c}"] = (len(ids), limit)
            while len(results) < len(limits):
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    if out.error is not None:
                        raise RuntimeError(f"transformers continuous batching failed on {out.request_id}: {out.error}")
                    results[out.request_id] = out
                elif out is None and not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing")
            sync()
            seconds = time.perf_counter() - started
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()
    finally:
        cb_log.setLevel(level)
    tokens = needed = 0
    for key, o in results.items():
        prompt_len, limit = limits[key]
        useful = _useful(list(o.generated_tokens), limit, eos)
        tokens += useful
        needed += _fed(prompt_len, useful, limit)
    # Ragged batches, no padding: what it computes is what it needs.
    return Result(f"transformers CB (max {max_requests} req)", wl.name, tokens, seconds, needed, needed)


def static_batches_process(
    model_dir, texts: list[str], limit: int, batch_size: int, work_dir, threads: int | None = None,
    timeout: float = 1800, workload: str = "small",
) -> Result:  # fmt: skip
    """(b) as a user runs it: a fresh interpreter that imports torch and transformers, loads the
    model with from_pretrained, tokenizes, sorts and generates static batches of `batch_size`
    on `threads` torch threads (None: torch's default, every core).
    seconds: its generate loop; end to end: from the process's start to its exit."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    where = Path(work_dir) / "plain-loop" / workload
    where.mkdir(parents=True, exist_ok=True)
    job, out = where / f"b{batch_size}.json", where / f"b{batch_size}.out.json"
    out.unlink(missing_ok=True)
    job.write_text(
        json.dumps(
            {"model": str(model_dir), "texts": texts, "limit": limit, "batch_size": batch_size, "threads": threads}
        )
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.baselines", str(job), str(out)], capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"plain loop b={batch_size}: exit status {proc.returncode}: {proc.stderr.strip()[-300:]}")
    res = json.loads(out.read_text())
    return Result(
        f"plain loop b={batch_size} (own process)", workload, res["tokens"], res["generate_s"], res["computed"],
        res["needed"], end_to_end_seconds=wall, extra={"threads": res["threads"], "load_s": res["load_s"]},
    )  # fmt: skip


def _plain_loop_main(job_path: str, out_path: str) -> None:
    """The child of static_batches_process: everything a script would do, timed from its start."""
    import json
    from pathlib import Path

    job = json.loads(Path(job_path).read_text())
    started = time.perf_counter()
    import torch

    from bench.model import load_model
    from bench.workloads import Workload
    from jobs.core.prompts import tokenize_prompt
    from jobs.core.spec import InputSpec

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    model, tokenizer = load_model(Path(job["model"]))
    spec = InputSpec(uri="unused", prompt_column="prompt")
    ids = tuple(tuple(tokenize_prompt(spec, t, tokenizer)) for t in job["texts"])
    wl = Workload("small", tuple(job["texts"]), ids, (job["limit"],) * len(ids))
    loaded = time.perf_counter()
    r = static_batches(model, tokenizer, wl, job["batch_size"])
    Path(out_path).write_text(
        json.dumps(
            {
                "tokens": r.completion_tokens,
                "generate_s": r.seconds,
                "computed": r.computed_positions,
                "needed": r.needed_positions,
                "load_s": loaded - started,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    import sys

    _plain_loop_main(*sys.argv[1:3])
