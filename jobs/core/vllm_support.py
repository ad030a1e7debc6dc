"""Whether the vLLM engine can run a spec: the checks the driver makes before any
replica starts (jobs/preflight.py) and a replica makes choosing its engine
(workers/engine_factory.py), written once so both sides decide alike.

Imports no vLLM: the driver's machine may not have it, and asking must not
load it (vLLM imports torch).
"""

from __future__ import annotations

import importlib.util

from jobs.core import adapters
from jobs.core.model import checkpoint_dtype
from jobs.core.rows import is_batch
from jobs.core.spec import MAX_TOP_LOGPROBS, JobSpec


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
    for name, adapter in sorted(spec.model.adapter_set().items()):
        try:
            config = adapters.read_config(adapter.path)
        except (OSError, ValueError):
            continue  # no adapter at all, which jobs/preflight.check_adapters refuses for either engine
        if reason := adapters.vllm_refusal(config):
            field = spec.model.adapter_field(name)
            return f"{field} {reason}, which vLLM 0.32 does not load; use model.engine: transformers"
    return None


def top_logprobs_asked(spec: JobSpec) -> int:
    """The most top logprobs a sequence of the job asks for: vLLM's max_logprobs must allow it."""
    if is_batch(spec.input):  # a line may ask for up to OpenAI's limit
        return MAX_TOP_LOGPROBS
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
