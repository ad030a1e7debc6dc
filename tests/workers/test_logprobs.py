"""Log-probabilities (generation.logprobs): the transformers engine's against a plain forward of
the tiny Llama, vLLM's per-step dicts turned into ours, and the columns a sequence gets.
(The two engines against each other: tests/workers/test_vllm_engine.py.)"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.core.rows import logprob_fields
from workers.engine import Request, SamplingParams, generate
from workers.stages.logprobs import logprob_values
from workers.stages.work import Generated
from workers.transformers_engine import TransformersEngine
from workers.vllm_engine import sample_logprobs

PROMPTS = ["Write a short poem", "The quick brown fox jumps over the lazy dog.", "Write a short poem about the sea and"]
K = 5

# -- the transformers engine against a plain forward ------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread is the fast one
    yield model, tokenizer
    torch.set_num_threads(threads)


def run(lm, logprobs=(K, K, K), **params):
    """The prompts in one batch of the engine, each request asking for its `logprobs`."""
    model, tokenizer = lm
    engine = TransformersEngine(model, tokenizer, SamplingParams(max_new_tokens=12, **params), 3, 100_000)
    asks = [
        Request(i, tuple(tokenizer(p).input_ids), i, 12, logprobs=k)
        for i, (p, k) in enumerate(zip(PROMPTS, logprobs))
    ]
    return asks, generate(engine, asks)


def reference(model, prompt_ids, tokens) -> torch.Tensor:
    """(len(tokens), V) log-softmax of the model's logits at each generated position: one plain
    forward over prompt and completion, no padding, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(tokens)])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


def test_greedy_logprobs_are_the_models_and_the_top_k_its_most_likely(lm):
    asks, done = run(lm)
    for r, c in zip(asks, done):
        assert len(c.token_ids) > 0 and len(c.token_logprobs) == len(c.top_logprobs) == len(c.token_ids)
        want = reference(lm[0], r.prompt_ids, c.token_ids)
        for j, (token, logprob, top) in enumerate(zip(c.token_ids, c.token_logprobs, c.top_logprobs)):
            assert logprob == pytest.approx(float(want[j, token]), abs=1e-5)
            ids, values = zip(*top)
            assert len(top) == K and list(values) == sorted(values, reverse=True)
            assert ids[0] == token  # greedy: the chosen token is the most likely
            assert set(ids) == set(torch.topk(want[j], K).indices.tolist())
            assert values == pytest.approx(torch.topk(want[j], K).values.tolist(), abs=1e-5)


def test_sampled_logprobs_are_the_models_before_penalty_and_temperature(lm):
    # vLLM's raw_logprobs: what the model gave each chosen token, not what the sampler drew it with.
    asks, done = run(lm, do_sample=True, temperature=0.5, top_k=4, repetition_penalty=1.5)
    for r, c in zip(asks, done):
        want = reference(lm[0], r.prompt_ids, c.token_ids)
        assert list(c.token_logprobs) == pytest.approx([float(want[j, t]) for j, t in enumerate(c.token_ids)], abs=1e-5)
        for token, logprob, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs):
            # The chosen token is listed exactly when at most K - 1 tokens are more likely.
            assert (token in dict(top)) == (sum(p > logprob for _, p in top) < K)


def test_only_the_requests_that_ask_get_logprobs(lm):
    _, (none, chosen, top) = run(lm, logprobs=(None, 0, 2))
    assert (none.token_logprobs, none.top_logprobs) == (None, None)
    assert len(chosen.token_logprobs) == len(chosen.token_ids) and chosen.top_logprobs is None
    assert all(len(step) == 2 for step in top.top_logprobs)
    _, plain = run(lm, logprobs=(None, None, None))
    assert [c.token_ids for c in plain] == [none.token_ids, chosen.token_ids, top.token_ids]  # asking changes no token

# -- vLLM's logprobs into ours ----------------------------------------------------------------------


@dataclass
class Logprob:
    """The fields of vllm.logprobs.Logprob that we read (importing vLLM here would load all of it)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def step(chosen: tuple[int, float, int], *top: tuple[int, float]) -> dict[int, Logprob]:
    """One position as vLLM builds it (vllm/logprobs.py append_logprobs_for_next_position): the chosen
    token at its rank, then ranks 1..K; the chosen one, when among them, is one entry."""
    token, logprob, rank = chosen
    entries = {token: Logprob(logprob, rank)}
    entries.update({t: Logprob(p, r) for r, (t, p) in enumerate(top, 1)})
    return entries


def test_the_chosen_tokens_logprobs_and_no_top_list_at_k_0():
    steps = [step((7, -0.5, 1)), step((3, -2.0, 4)), step((2, -0.1, 1))]  # the last: the EOS we drop
    assert sample_logprobs(steps, (7, 3), 0) == ((-0.5, -2.0), None)


def test_top_lists_come_by_rank_with_the_chosen_token_where_it_ranks():
    steps = [
        step((5, -0.2, 1), (5, -0.2), (9, -1.5), (4, -3.0)),  # chosen and most likely
        step((8, -4.0, 7), (1, -0.3), (2, -1.0), (6, -2.5)),  # chosen (sampled) outside the top 3
        step((2, -0.9, 2), (1, -0.6), (2, -0.9), (3, -1.9)),
    ]
    chosen, top = sample_logprobs(steps, (5, 8, 2), 3)
    assert chosen == (-0.2, -4.0, -0.9)
    assert top == (
        ((5, -0.2), (9, -1.5), (4, -3.0)),
        ((1, -0.3), (2, -1.0), (6, -2.5)),
        ((1, -0.6), (2, -0.9), (3, -1.9)),
    )


def test_a_tie_at_rank_k_keeps_the_chosen_token_and_k_entries():
    # Token 4 ties the 2nd most likely: vLLM ranks it 2 (one token is more likely), beside ranks 1 and 2.
    chosen, top = sample_logprobs([step((4, -1.0, 2), (1, -0.5), (6, -1.0))], (4,), 2)
    assert top == (((1, -0.5), (4, -1.0)),)


def test_tokens_a_constraint_masked_stay_out_of_the_top_list():
    inf = float("-inf")
    _, top = sample_logprobs([step((3, 0.0, 1), (3, 0.0), (0, inf), (1, inf))], (3,), 3)
    assert top == (((3, 0.0),),)


# -- the columns --------------------------------------------------------------------------------------


def test_a_sequence_that_asked_gets_every_column_and_an_exact_sum():
    logprobs = (-0.1, -1e-9, -2.5, -1e9)
    top = (((1, -0.1), (9, -2.0)), ((2, -1e-9),), ((7, -1.0), (3, -2.5)), ((5, -0.5), (6, -0.6)))
    g = Generated("abcd", "length", 4, token_ids=(1, 2, 3, 4), token_logprobs=logprobs, top_logprobs=top)
    values = logprob_values(g, top=True)
    assert values["token_ids"] == [1, 2, 3, 4] and values["token_logprobs"] == list(logprobs)
    assert values["logprob_sum"] == math.fsum(logprobs)
    assert values["top_logprobs"][0] == [{"token_id": 1, "logprob": -0.1}, {"token_id": 9, "logprob": -2.0}]
    # The values fit the columns' documented schema.
    table = pa.Table.from_pylist([values], schema=pa.schema(logprob_fields(top=True)))
    as_float32 = pa.scalar(-1e-9, pa.float32()).as_py()
    assert table.column("top_logprobs").to_pylist()[0][1] == [{"token_id": 2, "logprob": as_float32}]


def test_a_sequence_that_did_not_ask_has_nulls_and_k_0_has_no_top_list():
    plain = Generated("ab", "stop", 2, token_ids=(1, 2))
    columns = ["token_ids", "token_logprobs", "logprob_sum", "top_logprobs"]
    assert logprob_values(plain, top=True) == dict.fromkeys(columns)
    chosen_only = Generated("ab", "stop", 2, token_ids=(1, 2), token_logprobs=(-1.0, -2.0))
    want = {"token_ids": [1, 2], "token_logprobs": [-1.0, -2.0], "logprob_sum": -3.0}
    assert logprob_values(chosen_only, top=False) == want
    assert logprob_values(chosen_only, top=True)["top_logprobs"] is None
