"""Whether the vLLM engine can run a spec: the checks the driver makes before any
replica starts (jobs/preflight.py) and a replica makes choosing its engine
(workers/engine_factory.py), written once so both sides decide alike.

Imports no vLLM: the driver's machine may not have it, and asking must not
load it (vLLM imports torch).
"""

from __future__ import annotations

import importlib.util

from jobs.core.model import checkpoint_dtype
from jobs.core.spec import JobSpec


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def refuses(spec: JobSpec) -> str | None:
    """Why the vLLM engine cannot honour this spec's contract, or None."""
    if spec.generation.no_repeat_ngram_size:
        return "vLLM has no no_repeat_ngram_size; use model.engine: transformers, or drop it"
    cap, asked = spec.model.engine_options.get("max_logprobs"), top_logprobs_asked(spec)
    if isinstance(cap, int) and cap != -1 and asked > cap:  # vLLM refuses every request asking for more
        return (
            f"model.engine_options.max_logprobs {cap} is below generation.top_logprobs {asked}; "
            "raise it (or drop it: vLLM's default is 20)"
        )
    gpus = spec.resources.num_gpus
    if gpus > 1 and gpus != int(gpus):
        return f"resources.num_gpus {gpus} above 1 means tensor parallelism over whole GPUs; give an integer"
    return None


def top_logprobs_asked(spec: JobSpec) -> int:
    """The most top logprobs a sequence of the job asks for: vLLM's max_logprobs must allow it."""
    g = spec.generation
    return g.top_logprobs if g.logprobs else 0


def auto_passes_over(spec: JobSpec) -> str | None:
    """Why `auto` should not even try vLLM here, or None. On CPU, vLLM 0.32 runs
    bfloat16 and float16 with instructions many CPUs lack, and dies of SIGILL
    (no exception to fall back on): auto takes vLLM on CPU for float32 only."""
    if spec.resources.num_gpus == 0:
        dtype = spec.model.dtype if spec.model.dtype != "auto" else checkpoint_dtype(spec.model)
        if dtype != "float32":
            return f"{dtype} on CPU"
    return None
