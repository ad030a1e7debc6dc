"""The decode loop against `model.generate`, on tiny real Llama and GPT-2 checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engine import Completion, Request, SamplingParams, generate
from workers.transformers_engine import TransformersEngine

PROMPTS = [
    "Write a short poem",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and",
]
MAX_NEW = 16


@pytest.fixture(scope="module", params=["tiny_model", "tiny_gpt2"], ids=["llama", "gpt2"])
def lm(request):
    """(model, tokenizer) loaded with from_pretrained, as real checkpoints are."""
    path = request.getfixturevalue(request.param)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # One thread: on a shared machine, torch's default thread pool spins and a tiny model slows 20-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


def make_engine(lm, batch_size: int = 3, max_batch_tokens: int = 100_000, **params) -> TransformersEngine:
    model, tokenizer = lm
    return TransformersEngine(model, tokenizer, SamplingParams(max_new_tokens=MAX_NEW, **params), batch_size, max_batch_tokens)


def prompt_ids(lm, prompts=PROMPTS) -> list[list[int]]:
    return [lm[1](p).input_ids for p in prompts]


def requests(lm, prompts=PROMPTS, max_new=MAX_NEW, seed=0) -> list[Request]:
    return [Request(i, tuple(ids), seed + i, max_new) for i, ids in enumerate(prompt_ids(lm, prompts))]


def eos_set(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], "stop"
    return tokens, "length"


def hf_greedy(model, ids: list[int], max_new: int = MAX_NEW, **kwargs) -> tuple[list[int], str]:
    """One prompt, no padding: the reference `generate` output, eos cut off."""
    eos = kwargs.pop("eos_token_id", None) or sorted(eos_set(model))
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=0,
        **kwargs,
    )
    return cut_at_eos(out[0, len(ids) :].tolist(), set(eos))


def hf_greedy_batched(lm, prompts=PROMPTS, max_new: int = MAX_NEW) -> list[tuple[list[int], str]]:
    """All prompts in one left-padded batch through `generate`."""
    model, tokenizer = lm
    assert tokenizer.padding_side == "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)
    width = enc.input_ids.shape[1]
    return [cut_at_eos(row[width:].tolist(), eos_set(model)) for row in out]


def check_completion(lm, c: Completion, tokens: list[int], reason: str) -> None:
    assert list(c.token_ids) == tokens
    assert c.finish_reason == reason
    assert c.text == lm[1].decode(tokens, skip_special_tokens=True)


@pytest.fixture
def eos_is(lm, monkeypatch):
    """Make `token` an end-of-sequence token of the model (its own eos stays one)."""

    def set_eos(token: int) -> list[int]:
        model = lm[0]
        config = copy.deepcopy(model.generation_config)
        config.eos_token_id = sorted(eos_set(model) | {token})
        monkeypatch.setattr(model, "generation_config", config)
        return config.eos_token_id

    return set_eos


# -- greedy equals generate ---------------------------------------------------------------


def test_prompts_of_different_lengths_are_padded_in_one_batch(lm):
    lengths = [len(ids) for ids in prompt_ids(lm)]
    assert len(set(lengths)) == 3, lengths
    engine = make_engine(lm)
    engine.prefill_pad_limit = 1.0  # any padding allowed: one prefill for all
    engine.submit(requests(lm))
    engine.step()  # prefill all three together, and the first token
    assert engine.running is not None and len(engine.running.rows) == 3
    assert not engine.waiting
    # Left padding: the prefill held more positions than prompt tokens.
    assert engine.counters["padded_tokens"] - engine.counters["forward_tokens"] == sum(max(lengths) - n for n in lengths)


def test_prefill_padding_is_bounded_and_output_unchanged(lm):
    model, tokenizer = lm
    # A long prompt among short ones: one prefill would be mostly padding.
    texts = ["Return the number of items in the list. " * 5, "Write", "The quick", "Raise"]
    reqs = [Request(i, tuple(tokenizer(t).input_ids), 0, 6) for i, t in enumerate(texts)]
    bounded = make_engine(lm)
    out = generate(bounded, reqs)
    padding = bounded.counters["padded_tokens"] - bounded.counters["forward_tokens"]
    assert 0 < padding <= bounded.prefill_pad_limit * bounded.counters["prefill_positions"]
    unbounded = make_engine(lm)
    unbounded.prefill_pad_limit = 1.0
    assert [c.token_ids for c in out] == [c.token_ids for c in generate(unbounded, reqs)]
    assert unbounded.counters["padded_tokens"] > bounded.counters["padded_tokens"]


def test_greedy_equals_generate_token_for_token(lm):
    model, _ = lm
    completions = generate(make_engine(lm), requests(lm))
    batched = hf_greedy_batched(lm)
    for c, ids, reference in zip(completions, prompt_ids(lm), batched):
        alone = hf_greedy(model, ids)
        assert alone == reference  # generate agrees with itself padded and unpadded
        check_completion(lm, c, *alone)
    assert [c.key for c in completions] == [0, 1, 2]


def test_results_follow_request_order_not_batch_order(lm):
    reqs = requests(lm)
    shuffled = [reqs[2], reqs[0], reqs[1]]
    engine = make_engine(lm)
    by_key = {c.key: c for c in generate(engine, reqs)}
    again = generate(engine, shuffled)
    assert [c.key for c in again] == [2, 0, 1]
    assert again == [by_key[2], by_key[0], by_key[1]]


def test_length_finish_when_max_new_tokens_is_hit(lm):
    model, _ = lm
    reqs = requests(lm, max_new=5)
    for c, ids in zip(generate(make_engine(lm), reqs), prompt_ids(lm)):
        tokens, reason = hf_greedy(model, ids, max_new=5)
        assert reason == "length"  # no eos in the reference: the check below is about length
        assert c.finish_reason == "length"
        assert len(c.token_ids) == 5
        assert list(c.token_ids) == tokens


def test_rows_with_different_budgets_leave_the_batch_without_disturbing_the_others(lm):
    model, _ = lm
    budgets = [3, 16, 9]
    reqs = [Request(i, tuple(ids), 0, budgets[i]) for i, ids in enumerate(prompt_ids(lm))]
    for c, ids, n in zip(generate(make_engine(lm), reqs), prompt_ids(lm), budgets):
        check_completion(lm, c, *hf_greedy(model, ids, max_new=n))
        assert len(c.token_ids) == n


def run_steps(engine: TransformersEngine, reqs: list[Request]) -> tuple[list[Completion], list[list]]:
    """Drive the engine step by step; returns the completions in request order and
    the keys of the running batch after every step."""
    engine.submit(reqs)
    done, running = {}, []
    while engine.has_work():
        for c in engine.step():
            assert c.key not in done, f"{c.key} finished twice"
            done[c.key] = c
        running.append([row.request.key for row in engine.running.rows] if engine.running else [])
    return [done[r.key] for r in reqs], running


def spliced(running: list[list]) -> bool:
    """Whether a sequence joined a batch that was already running."""
    return any(before and set(after) - set(before) for before, after in zip(running, running[1:]))


def varied_requests(lm, count: int = 9, seed: int = 0) -> list[Request]:
    """Many requests with different prompt lengths and budgets, so rows leave at different steps."""
    ids = prompt_ids(lm)
    budgets = [3, 16, 9, 5, 12, 1, 16, 7, 11]
    return [Request(k, tuple(ids[k % 3]), seed + k, budgets[k % len(budgets)]) for k in range(count)]


def test_continuous_batching_splices_rows_in_and_matches_generate(lm):
    model, _ = lm
    reqs = varied_requests(lm)
    engine = make_engine(lm, batch_size=4)
    completions, running = run_steps(engine, reqs)
    assert spliced(running), running
    assert max(len(keys) for keys in running) <= 4
    for c, r in zip(completions, reqs):
        check_completion(lm, c, *hf_greedy(model, list(r.prompt_ids), max_new=r.max_new_tokens))
        assert len(c.token_ids) == r.max_new_tokens


def test_token_budget_bounds_the_running_batch(lm):
    reqs = varied_requests(lm)
    widest = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs)
    engine = make_engine(lm, batch_size=8, max_batch_tokens=2 * widest)
    engine.submit(reqs)
    done = []
    while engine.has_work():
        done += engine.step()
        if engine.running is not None:
            rows = engine.running.rows
            assert len(rows) * max(r.final_width for r in rows) <= engine.max_batch_tokens
            assert engine.running.mask.shape[1] <= widest
    assert sorted(c.key for c in done) == list(range(9))
    # Batching changes nothing in the greedy result.
    assert [c for c in sorted(done, key=lambda c: c.key)] == generate(make_engine(lm, batch_size=1), reqs)


def test_a_single_request_larger_than_the_budget_still_runs(lm):
    r = requests(lm)[1]
    c = generate(make_engine(lm, max_batch_tokens=4), [r])[0]
    assert c.finish_reason == "length" and len(c.token_ids) == MAX_NEW


# -- end of sequence ------------------------------------------------------------------------


def test_eos_ends_a_row_with_stop_and_is_excluded(lm, eos_is):
    model, tokenizer = lm
    ids = prompt_ids(lm)
    free = hf_greedy(model, ids[1])[0]
    token = free[4]  # generate emits it within the budget: make it an end-of-sequence token
    eos = eos_is(token)
    first = free.index(token)
    completions = generate(make_engine(lm), requests(lm))
    c = completions[1]
    assert c.finish_reason == "stop"
    assert list(c.token_ids) == free[:first]
    assert token not in c.token_ids
    assert c.text == tokenizer.decode(free[:first], skip_special_tokens=True)
    # Every row, the ones that go on after this one leaves included, still matches generate.
    for c, prompt in zip(completions, ids):
        check_completion(lm, c, *hf_greedy(model, prompt, eos_token_id=eos))


@pytest.mark.parametrize("position", [6, 0], ids=["mid-sequence", "first-token"])
def test_eos_under_continuous_batching_matches_generate(lm, eos_is, position):
    model, _ = lm
    reqs = varied_requests(lm)
    free = hf_greedy(model, list(reqs[2].prompt_ids))[0]
    eos = eos_is(free[position])  # at 0, rows end in their prefill, some spliced into a running batch
    completions, running = run_steps(make_engine(lm, batch_size=4), reqs)
    assert spliced(running)
    assert any(c.finish_reason == "stop" for c in completions)
    for c, r in zip(completions, reqs):
        check_completion(lm, c, *hf_greedy(model, list(r.prompt_ids), max_new=r.max_new_tokens, eos_token_id=eos))


def test_eos_as_first_token_gives_an_empty_completion(lm, eos_is):
    model, _ = lm
    ids = prompt_ids(lm)
    eos_is(hf_greedy(model, ids[0])[0][0])
    c = generate(make_engine(lm), requests(lm))[0]
    assert c == Completion(0, (), "", "stop")


# -- sampling ---------------------------------------------------------------------------------


def sampled(lm, reqs, **params) -> list[tuple[int, ...]]:
    return [c.token_ids for c in generate(make_engine(lm, do_sample=True, **params), reqs)]


def test_same_seed_same_sample_different_seed_different_sample(lm):
    first = sampled(lm, requests(lm, seed=10))
    assert sampled(lm, requests(lm, seed=10)) == first
    other = sampled(lm, requests(lm, seed=1000))
    assert other != first
    assert sum(a != b for a, b in zip(first, other)) >= 2
    greedy = [c.token_ids for c in generate(make_engine(lm), requests(lm))]
    assert first != greedy


def test_each_request_samples_from_its_own_generator(lm):
    reqs = requests(lm, seed=5)
    # The same prompt under two seeds in one batch: two different texts.
    twins = [Request(0, reqs[0].prompt_ids, 1, MAX_NEW), Request(1, reqs[0].prompt_ids, 2, MAX_NEW)]
    a, b = sampled(lm, twins)
    assert a != b


def test_sampled_text_does_not_depend_on_batch_neighbours(lm):
    reqs = requests(lm, seed=3)
    together = sampled(lm, reqs, temperature=0.9, top_p=0.95)
    for i, r in enumerate(reqs):
        alone = sampled(lm, [r], temperature=0.9, top_p=0.95)[0]
        assert alone == together[i], f"request {i}"
    # Nor on the order the requests come in, nor on the batch size.
    assert sampled(lm, reqs[::-1], temperature=0.9, top_p=0.95) == together[::-1]
    one_by_one = [c.token_ids for c in generate(make_engine(lm, batch_size=1, do_sample=True, temperature=0.9, top_p=0.95), reqs)]
    assert one_by_one == together


def test_sampled_text_is_the_same_under_continuous_batching(lm):
    reqs = varied_requests(lm, seed=40)
    params = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
    completions, running = run_steps(make_engine(lm, batch_size=4, **params), reqs)
    assert spliced(running)
    alone = [generate(make_engine(lm, batch_size=1, **params), [r])[0] for r in reqs]
    assert completions == alone


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 3.0}])
def test_sampling_restricted_to_the_top_token_equals_greedy(lm, params):
    greedy = [c.token_ids for c in generate(make_engine(lm), requests(lm))]
    assert sampled(lm, requests(lm, seed=77), **params) == greedy


def test_top_k_restricts_the_choice(lm):
    model, _ = lm
    # With top_k=2 the first sampled token is one of the two highest logits of the prompt.
    ids = prompt_ids(lm)
    with torch.no_grad():
        logits = [model(torch.tensor([p])).logits[0, -1] for p in ids]
    allowed = [set(torch.topk(row, 2).indices.tolist()) for row in logits]
    for seed in range(5):
        for tokens, ok in zip(sampled(lm, requests(lm, max_new=1, seed=seed), top_k=2), allowed):
            assert len(tokens) <= 1 and (not tokens or tokens[0] in ok)


# -- repetition controls -------------------------------------------------------------------------


def bigrams(tokens: list[int]) -> list[tuple[int, int]]:
    return list(zip(tokens, tokens[1:]))


@pytest.mark.parametrize("n", [1, 3])
def test_no_repeat_ngram_sizes_match_generate(lm, n):
    model, _ = lm
    for c, p in zip(generate(make_engine(lm, no_repeat_ngram_size=n), requests(lm)), prompt_ids(lm)):
        check_completion(lm, c, *hf_greedy(model, p, no_repeat_ngram_size=n))


def test_no_repeat_ngram_size_2_never_repeats_a_bigram(lm):
    model, _ = lm
    ids = prompt_ids(lm)
    for p in ids:
        assert len(set(bigrams(p))) == len(bigrams(p)), "precondition: prompts have no repeated bigram"
    free = generate(make_engine(lm), requests(lm))
    histories = [p + list(c.token_ids) for p, c in zip(ids, free)]
    assert any(len(set(bigrams(h))) < len(bigrams(h)) for h in histories), (
        "precondition: unconstrained greedy output repeats itself, so the option has work to do"
    )
    constrained = generate(make_engine(lm, no_repeat_ngram_size=2), requests(lm))
    for c, p in zip(constrained, ids):
        history = p + list(c.token_ids)
        assert len(set(bigrams(history))) == len(bigrams(history)), c
        check_completion(lm, c, *hf_greedy(model, p, no_repeat_ngram_size=2))


def test_repetition_penalty_matches_generate(lm):
    model, _ = lm
    plain = generate(make_engine(lm), requests(lm))
    penalized = generate(make_engine(lm, repetition_penalty=1.3), requests(lm))
    assert [c.token_ids for c in penalized] != [c.token_ids for c in plain]
    for c, p in zip(penalized, prompt_ids(lm)):
        check_completion(lm, c, *hf_greedy(model, p, repetition_penalty=1.3))


def test_repetition_penalty_below_one_matches_generate(lm):
    model, _ = lm
    for c, p in zip(generate(make_engine(lm, repetition_penalty=0.8), requests(lm)), prompt_ids(lm)):
        check_completion(lm, c, *hf_greedy(model, p, repetition_penalty=0.8))


def test_controls_combined_with_continuous_batching(lm):
    model, _ = lm
    reqs = varied_requests(lm)
    engine = make_engine(lm, batch_size=4, repetition_penalty=1.2, no_repeat_ngram_size=3)
    completions, running = run_steps(engine, reqs)
    assert spliced(running)
    for c, r in zip(completions, reqs):
        reference = hf_greedy(
            model, list(r.prompt_ids), max_new=r.max_new_tokens, repetition_penalty=1.2, no_repeat_ngram_size=3
        )
        check_completion(lm, c, *reference)


# -- stop strings --------------------------------------------------------------------------------


def first_occurrences(text: str, start: int = 0):
    """(s, i): two-character printable ASCII strings whose first occurrence in `text` is at i >= start."""
    for i in range(start, len(text) - 1):
        s = text[i : i + 2]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            yield s, i


def pick_stop(text: str) -> tuple[str, int]:
    """A stop string the text contains, preferably not at its very start."""
    found = list(first_occurrences(text))
    if not found:
        pytest.fail(f"no usable stop string in {text!r}")
    return next(((s, i) for s, i in found if i > 0), found[0])


def test_stop_string_cuts_the_text_before_it(lm):
    free = generate(make_engine(lm), requests(lm))
    for i, c in enumerate(free):
        stop, at = pick_stop(c.text)
        got = generate(make_engine(lm, stop=(stop,)), requests(lm))[i]
        assert got.finish_reason == "stop", (stop, c.text)
        assert got.text == c.text[:at]
        assert stop not in got.text
        # Decoding stops where the string appeared: its tokens are a prefix of the free run's.
        assert c.token_ids[: len(got.token_ids)] == got.token_ids
        assert len(got.token_ids) < len(c.token_ids)
        assert stop in lm[1].decode(list(got.token_ids))


def test_earliest_of_several_stop_strings_wins(lm):
    free = generate(make_engine(lm), requests(lm))
    for i, c in enumerate(free):
        first, at = pick_stop(c.text)
        later = next(first_occurrences(c.text, at + 1), None)
        if later is None:
            continue
        got = generate(make_engine(lm, stop=(later[0], first)), requests(lm))[i]
        assert (got.text, got.finish_reason) == (c.text[:at], "stop")
        break
    else:
        pytest.fail(f"no text with two stop strings in {[c.text for c in free]}")


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop(lm):
    c = generate(make_engine(lm), requests(lm))[0]
    stop, _ = pick_stop(c.text)
    stopped = generate(make_engine(lm, stop=(stop,)), requests(lm))[0]
    n = len(stopped.token_ids)
    got = generate(make_engine(lm, stop=(stop,)), requests(lm, max_new=n))[0]
    assert got.finish_reason == "stop"
    assert got.token_ids == stopped.token_ids


def test_stop_string_never_generated_changes_nothing(lm):
    free = generate(make_engine(lm), requests(lm))
    assert generate(make_engine(lm, stop=("\u2603never\u2603",)), requests(lm)) == free


# -- a sequence that breaks the model ---------------------------------------------------------------


def broken_request(lm, key) -> Request:
    """A prompt with a token id outside the vocabulary: the embedding lookup raises."""
    return Request(key, (lm[1]("Write").input_ids[0], 10_000), 0, MAX_NEW)


def test_a_failing_sequence_comes_back_as_an_error_alone(lm):
    model, _ = lm
    good = varied_requests(lm, count=5)
    reqs = good[:2] + [broken_request(lm, "bad")] + good[2:]
    engine = make_engine(lm, batch_size=4)
    completions = generate(engine, reqs)
    bad = completions[2]
    assert (bad.key, bad.finish_reason, bad.token_ids, bad.text) == ("bad", "error", (), "")
    assert "IndexError" in bad.error
    for c, r in zip(completions[:2] + completions[3:], good):
        assert c.error is None
        check_completion(lm, c, *hf_greedy(model, list(r.prompt_ids), max_new=r.max_new_tokens))
    assert engine.batch_size == 4  # back to full size once the culprit is isolated
    assert not engine.has_work()


def test_a_failing_prefill_does_not_fail_the_healthy_running_sequence(lm):
    model, _ = lm
    ids = prompt_ids(lm)
    # Prefilled first (longest prompts): A runs long, B leaves after 2 tokens;
    # then the short broken prompt is spliced in next to A alone.
    a = Request("A", tuple(ids[1]), 0, MAX_NEW)
    b = Request("B", tuple(ids[2]), 0, 2)
    completions = generate(make_engine(lm, batch_size=2), [a, b, broken_request(lm, "bad")])
    assert [c.finish_reason for c in completions] == ["length", "length", "error"]
    check_completion(lm, completions[0], *hf_greedy(model, list(a.prompt_ids)))
