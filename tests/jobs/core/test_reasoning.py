"""jobs/core/reasoning.py: which tags `auto` finds, and every way a completion splits, on
token ids (single-token tags) and on text (tags of several tokens), with the tests' BPE tokenizer."""

from __future__ import annotations

import pytest

from jobs.core.errors import ModelError
from jobs.core.reasoning import KNOWN_TAGS, Split, TagIds, Tags, job_tags, resolve, split
from jobs.core.spec import ModelSpec, ReasoningTags
from tests.tiny_model import CHAT_TEMPLATE, THINKING_TEMPLATE, build_tokenizer

THINK = Tags("<think>", "</think>")
MISTRAL = Tags("[THINK]", "[/THINK]")  # several tokens each in the tests' tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.fixture(scope="module")
def special_tokenizer():
    """Tags that are special tokens: decoding skips them, as a chat model's tokenizer may."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    return tok


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def decoder(tokenizer, stop: tuple[str, ...] = ()):
    """The engines' completion text (workers/engine.completion_text), which the stage passes in."""
    from workers.engine import completion_text

    return lambda ids: completion_text(tokenizer, ids, stop)


def split_text(tokenizer, tags: Tags, text: str, prompt: str = "", stop: tuple[str, ...] = ()):
    """The split of `text`'s tokens, and the tokens."""
    ids = ids_of(tokenizer, text)
    return split(ids, tags, TagIds.of(tags, tokenizer), decoder(tokenizer, stop), prompt), ids


# resolve


def test_auto_finds_the_end_tag_in_the_chat_template():
    assert resolve(THINKING_TEMPLATE, {}) == THINK
    assert resolve("{{ '[THINK]' }}...{{ '[/THINK]' }}", {}) == MISTRAL
    # A tokenizer's several named templates: any of them.
    assert resolve({"default": CHAT_TEMPLATE, "think": "<seed:think>…</seed:think>"}, {}) == Tags(
        "<seed:think>", "</seed:think>"
    )


def test_the_template_decides_before_the_vocabulary():
    vocab = {"<think>": 5, "</think>": 6}
    assert resolve("[/THINK]", vocab) == MISTRAL


def test_auto_finds_a_pair_of_single_tokens_in_the_vocabulary(tokenizer):
    assert resolve(CHAT_TEMPLATE, tokenizer.get_vocab()) == THINK
    assert resolve(None, {"<|START_THINKING|>": 1, "<|END_THINKING|>": 2}) == KNOWN_TAGS[-1]


def test_auto_finds_nothing_in_a_plain_tokenizer():
    plain = build_tokenizer()
    assert resolve(plain.chat_template, plain.get_vocab()) is None
    assert resolve(None, {"</think>": 1}) is None  # half a pair is no pair


def test_a_job_takes_the_tags_it_gives_or_those_auto_finds(tokenizer):
    model = ModelSpec(path="/models/m")
    assert job_tags(ReasoningTags(start="<a>", end="</a>"), model, tokenizer) == Tags("<a>", "</a>")
    assert job_tags("auto", model, tokenizer) == THINK
    looked_for = r"auto, but the tokenizer of '/models/m' shows no thinking tags \(looked for <think>…</think>, "
    with pytest.raises(ModelError, match=looked_for):
        job_tags("auto", model, build_tokenizer())


def test_tag_ids_are_single_tokens_only(tokenizer):
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert TagIds.of(THINK, tokenizer) == TagIds(start, end)
    assert TagIds.of(MISTRAL, tokenizer) == TagIds(None, None)

    class WithUnknown:  # a tokenizer that maps what it lacks to its unknown token
        unk_token_id = 3

        def convert_tokens_to_ids(self, token):
            return {"<think>": 7}.get(token, 3)

    assert TagIds.of(THINK, WithUnknown()) == TagIds(7, None)


# split on ids


def test_thinking_opened_by_the_prompt_splits_at_the_end_token(tokenizer):
    s, ids = split_text(tokenizer, THINK, "the sea and the wind</think>A short poem.", prompt="assistant: <think>")
    end = ids.index(tokenizer.convert_tokens_to_ids("</think>"))
    assert s == Split("the sea and the wind", "A short poem.", end + 1)


def test_a_start_tag_in_the_output_opens_the_thinking(tokenizer):
    s, ids = split_text(tokenizer, THINK, "<think>a plan</think>\n\nThe answer")
    assert s == Split("a plan", "The answer", ids.index(tokenizer.convert_tokens_to_ids("</think>")) + 1)


def test_special_tags_split_though_decoding_drops_them(special_tokenizer):
    s, ids = split_text(special_tokenizer, THINK, "<think>a plan</think> The answer")
    assert s == Split("a plan", "The answer", ids.index(special_tokenizer.convert_tokens_to_ids("</think>")) + 1)


def test_stop_strings_cut_the_answer(tokenizer):
    s, _ = split_text(tokenizer, THINK, "a plan</think>The answer. More", stop=(". ",))
    assert (s.reasoning, s.answer) == ("a plan", "The answer")


def test_empty_thinking_is_empty_not_none(tokenizer):
    s, _ = split_text(tokenizer, THINK, "<think></think>Answer")
    assert s == Split("", "Answer", 2)


# split on text: tags of several tokens


def test_multi_token_tags_split_on_the_text(tokenizer):
    text = "[THINK]count them[/THINK]  Use len."
    s, ids = split_text(tokenizer, MISTRAL, text)
    assert (s.reasoning, s.answer) == ("count them", "Use len.")
    decode = decoder(tokenizer)
    # The fewest tokens whose text holds the end tag.
    assert "[/THINK]" in decode(ids[: s.reasoning_tokens]) and "[/THINK]" not in decode(ids[: s.reasoning_tokens - 1])
    assert s.reasoning_tokens < len(ids)


def test_an_end_tag_split_across_tokens_is_found_in_the_text(tokenizer):
    """An added tag token the model spelled in pieces ("</" "think>") still ends the thinking."""
    pieces = [*ids_of(tokenizer, "plan</"), *ids_of(tokenizer, "think>Answer")]
    assert tokenizer.convert_tokens_to_ids("</think>") not in pieces
    s = split(pieces, THINK, TagIds.of(THINK, tokenizer), decoder(tokenizer), "")
    assert (s.reasoning, s.answer) == ("plan", "Answer")


# no end tag


@pytest.mark.parametrize("tags", [THINK, MISTRAL], ids=["ids", "text"])
def test_thinking_cut_short_is_all_reasoning(tokenizer, tags):
    s, ids = split_text(tokenizer, tags, f"so {tags.start}still thinking")
    assert s == Split("still thinking", "", len(ids))


@pytest.mark.parametrize("tags", [THINK, MISTRAL], ids=["ids", "text"])
def test_a_prompt_that_opens_the_thinking_makes_it_all_reasoning(tokenizer, tags):
    s, ids = split_text(tokenizer, tags, "still thinking", prompt=f"assistant: {tags.start}\n")
    assert s == Split("still thinking", "", len(ids))


@pytest.mark.parametrize("tags", [THINK, MISTRAL], ids=["ids", "text"])
def test_no_tags_at_all_is_no_thinking(tokenizer, tags):
    """Unlike vLLM's parsers: a model with thinking off (Qwen3) writes no tags, and its text is the answer."""
    s, _ = split_text(tokenizer, tags, "  Just the answer", prompt="assistant:")
    assert s == Split(None, "  Just the answer", 0)
