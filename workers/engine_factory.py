"""Choosing and loading the engine a replica runs (model.engine: transformers, vllm or auto).

Apart from the engine interface (workers/engine.py), which both engines
import: the factory imports both engines, so it sits above them. The engines
are imported when a replica asks for one, so importing the replica's module
loads neither torch nor vLLM.
"""

from __future__ import annotations

import logging

from jobs.core import vllm_support
from jobs.core.spec import JobSpec
from workers.engine import Engine

log = logging.getLogger(__name__)


def create_engine(spec: JobSpec) -> Engine:
    """The engine a replica of `spec` runs, with its model loaded.

    `auto` takes vLLM where it is installed, can honour the spec, and runs
    this model here (it generates one token to prove it; on CPU only in
    float32); else transformers."""
    from workers.transformers_engine import TransformersEngine
    from workers.vllm_engine import VllmEngine

    choice = spec.model.engine
    if choice == "vllm":
        return VllmEngine.from_spec(spec)
    if choice == "auto" and vllm_support.installed() and not vllm_support.refuses(spec):
        if reason := vllm_support.auto_passes_over(spec):
            log.info("not trying vLLM for %s (%s); using the transformers engine", spec.model.path, reason)
            return TransformersEngine.from_spec(spec)
        try:
            return VllmEngine.from_spec(spec)
        except Exception as e:  # anything vLLM raises means: not this model, here
            log.warning("vLLM cannot run %s here (%s: %s); using the transformers engine", spec.model.path,
                        type(e).__name__, e)
    return TransformersEngine.from_spec(spec)
