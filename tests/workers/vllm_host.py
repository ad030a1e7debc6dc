"""Engines for tests/workers/test_vllm_engine.py, built in a process of their own.

At start-up vLLM 0.32's CPU platform walks every module loaded in its
process, and a werkzeug proxy there (moto's S3 server, which other tests load
into the pytest process) raises on that walk. Replicas are clean Ray worker
processes; the engine tests get a clean spawned process too, with the
engines cached in it between calls.
"""

from __future__ import annotations

import json

from jobs.core.spec import spec_from_dict
from tests.conftest import job_dict

_engines: dict = {}


def _engine(model: str, engine: str, generation: dict):
    from workers.engine_factory import create_engine

    key = (model, engine, json.dumps(generation, sort_keys=True))
    if key not in _engines:
        data = job_dict("/in", "/out", model, generation={"max_new_tokens": 12, **generation})
        data["model"]["engine"] = engine
        if engine in ("vllm", "auto"):
            data["model"]["engine_options"] = {"enforce_eager": True}  # seconds to start, not a compile
        _engines[key] = create_engine(spec_from_dict(data))
    return _engines[key]


def _requests(engine, prompts: list[str], max_new: list[int], seeds: list[int], structured=None):
    from workers.engine import Request

    tok = engine.tokenizer
    structured = structured or [None] * len(prompts)
    return [Request(i, tuple(tok(p).input_ids), seeds[i], max_new[i], structured=structured[i]) for i, p in enumerate(prompts)]


def generate(
    model: str, engine: str, generation: dict, prompts: list[str], max_new: list[int], seeds: list[int], structured=None
):
    """(engine name, [(token ids, text, finish reason)]) for the prompts, in order; `structured`:
    each request's constraint (jobs/core/structured.py), for an engine of a structured job's `generation`."""
    from workers.engine import generate as run

    e = _engine(model, engine, generation)
    done = run(e, _requests(e, prompts, max_new, seeds, structured))
    return e.name, [(c.token_ids, c.text, c.finish_reason) for c in done]


def vllm_grammars(constraints: list, flexible: bool) -> list[str]:
    """The grammar vLLM's guidance backend builds for each constraint, from the request we give it."""
    from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
    from vllm.v1.structured_output.request import get_structured_output_key

    from workers.vllm_engine import _structured_outputs

    grammars = []
    for s in constraints:
        kind, text = get_structured_output_key(_structured_outputs(s))
        grammars.append(serialize_guidance_grammar(kind, text, disable_any_whitespace=not flexible))
    return grammars


def generate_logprobs(model: str, engine: str, prompts: list[str], max_new: list[int], k: int):
    """(engine name, [(token ids, token logprobs, top logprobs)]): greedy, each request asking for `k`."""
    from dataclasses import replace

    from workers.engine import generate as run

    e = _engine(model, engine, {})
    asks = [replace(r, logprobs=k) for r in _requests(e, prompts, max_new, list(range(len(prompts))))]
    return e.name, [(c.token_ids, c.token_logprobs, c.top_logprobs) for c in run(e, asks)]


def abort_then_serve(model: str, prompts: list[str]) -> tuple[list, bool, list]:
    """Submit, step once, abort all: (aborted keys, has_work after, keys of a later generate)."""
    from workers.engine import generate as run

    e = _engine(model, "vllm", {})
    reqs = _requests(e, prompts, [12] * len(prompts), list(range(len(prompts))))
    e.submit(reqs)
    e.step()
    aborted = sorted(r.key for r in e.abort_all())
    return aborted, e.has_work(), [c.key for c in run(e, reqs[:2])]


def _one_at_a_time(model: str, prompts: list[str], limits: list[int], engine_options: dict) -> tuple[list, dict]:
    """A vLLM engine with batch_size 1 run to the end: (keys in the order it finished them, which is
    the order it admitted them; its counters)."""
    from workers.engine_factory import create_engine

    data = job_dict("/in", "/out", model, resources={"batch_size": 1}, generation={"max_new_tokens": max(limits)})
    data["model"].update(engine="vllm", engine_options={"enforce_eager": True, **engine_options})
    e = create_engine(spec_from_dict(data))
    e.submit(_requests(e, prompts, limits, list(range(len(prompts)))))
    finished = []
    while e.has_work():
        finished += [c.key for c in e.step()]
    return finished, e.stats()


def admission_order(model: str, limits: list[int], engine_options: dict) -> list[int]:
    """Keys of requests with these max_new_tokens, in the order one-at-a-time vLLM admitted them."""
    return _one_at_a_time(model, ["Write a short poem about the sea"] * len(limits), limits, engine_options)[0]


def prefix_cache_run(model: str, prompts: list[str], engine_options: dict) -> tuple[list, dict]:
    """One sequence at a time, arrival order (fcfs) and small KV blocks (the CPU default, 128
    tokens, is the tiny model's whole context): (keys in the order vLLM admitted them, the
    engine's counters)."""
    options = {"scheduling_policy": "fcfs", "block_size": 32, **engine_options}
    return _one_at_a_time(model, prompts, [4] * len(prompts), options)
