"""Turning input rows into prompt text, or typed per-row errors."""

from __future__ import annotations

import copy

import pytest

from jobs.core.prompts import (
    CHAT_TEMPLATE_ERROR,
    EMPTY_PROMPT,
    PROMPT_TOO_LONG,
    TEMPLATE_ERROR,
    RowError,
    build_prompt,
    max_new_tokens,
    render_prompt,
    tokenize_prompt,
)
from jobs.core.spec import InputSpec, spec_from_dict
from tests.tiny_model import CHAT_TEMPLATE, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def column_spec(**kw) -> InputSpec:
    return InputSpec(uri="/in", prompt_column="prompt", **kw)


def template_spec(template: str) -> InputSpec:
    return InputSpec(uri="/in", prompt_template=template)


def messages_spec() -> InputSpec:
    return InputSpec(uri="/in", messages_column="messages")


def row_error(spec, row, tokenizer) -> RowError:
    with pytest.raises(RowError) as info:
        render_prompt(spec, row, tokenizer)
    return info.value


# -- prompt_column --------------------------------------------------------------------------


def test_prompt_column_is_used_verbatim(tokenizer):
    text = "  Write a short poem about the sea.\n"
    assert render_prompt(column_spec(), {"prompt": text, "topic": "x"}, tokenizer) == text


@pytest.mark.parametrize("value, word", [(None, "null"), ("", "empty"), ("   \n\t", "empty")])
def test_null_or_blank_prompt_is_an_empty_prompt_error(tokenizer, value, word):
    e = row_error(column_spec(), {"prompt": value}, tokenizer)
    assert e.code == EMPTY_PROMPT == "empty_prompt"
    assert "prompt" in str(e) and word in str(e)


def test_prompt_that_is_not_text_is_a_row_error(tokenizer):
    e = row_error(column_spec(), {"prompt": 42}, tokenizer)
    assert e.code == TEMPLATE_ERROR
    assert "int" in str(e)


# -- prompt_template -----------------------------------------------------------------------


def test_template_fills_named_columns(tokenizer):
    spec = template_spec("Write a {style} poem about {topic}; {style}!")
    row = {"style": "sad", "topic": "the sea", "other": None}
    assert render_prompt(spec, row, tokenizer) == "Write a sad poem about the sea; sad!"


def test_template_formats_non_text_values_and_keeps_literal_braces(tokenizer):
    spec = template_spec("{{json}} item {n:03d} of {total}")
    assert render_prompt(spec, {"n": 7, "total": 12.5}, tokenizer) == "{json} item 007 of 12.5"


def test_template_with_a_null_value_names_the_column(tokenizer):
    spec = template_spec("Write a {style} poem about {topic}")
    e = row_error(spec, {"style": None, "topic": "wind"}, tokenizer)
    assert e.code == TEMPLATE_ERROR == "template_error"
    assert "'style'" in str(e) and "'topic'" not in str(e)


def test_template_that_fails_on_a_row_is_a_row_error(tokenizer):
    spec = template_spec("item {n:03d}")
    e = row_error(spec, {"n": "seven"}, tokenizer)  # a format spec for numbers, given text
    assert e.code == TEMPLATE_ERROR
    assert "prompt_template failed" in str(e)


def test_template_rendering_blank_is_an_empty_prompt(tokenizer):
    e = row_error(template_spec("{a}{b}"), {"a": " ", "b": "\n"}, tokenizer)
    assert e.code == EMPTY_PROMPT


def test_render_does_not_mutate_the_row(tokenizer):
    row = {"style": "sad", "topic": "x", "messages": [{"role": "user", "content": "hi"}]}
    before = copy.deepcopy(row)
    render_prompt(template_spec("{style} {topic}"), row, tokenizer)
    render_prompt(messages_spec(), row, tokenizer)
    assert row == before


# -- messages_column -----------------------------------------------------------------------


def test_messages_use_the_tokenizers_chat_template(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}
    text = render_prompt(messages_spec(), row, tokenizer)
    assert text == "system: Be brief.\nuser: Hi there\nassistant:"
    # The same as rendering it with the tokenizer directly, generation prompt included.
    assert text == tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)


def test_messages_from_a_parquet_list_of_structs(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "m.parquet")
    rows = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [render_prompt(messages_spec(), r, tokenizer) for r in rows] == ["user: one\nassistant:", "user: two\nassistant:"]


@pytest.mark.parametrize("value, word", [(None, "null"), ([], "empty")])
def test_null_or_empty_messages_are_an_empty_prompt(tokenizer, value, word):
    e = row_error(messages_spec(), {"messages": value}, tokenizer)
    assert e.code == EMPTY_PROMPT
    assert "messages" in str(e) and word in str(e)


def test_chat_template_failure_is_a_row_error(tokenizer):
    strict = build_tokenizer()
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHAT_TEMPLATE
    ok = render_prompt(messages_spec(), {"messages": [{"role": "user", "content": "hi"}]}, strict)
    assert ok == "user: hi\nassistant:"
    e = row_error(messages_spec(), {"messages": [{"role": "system", "content": "x"}]}, strict)
    assert e.code == CHAT_TEMPLATE_ERROR == "chat_template_error"
    assert "no system role" in str(e)


def test_malformed_messages_are_a_row_error(tokenizer):
    e = row_error(messages_spec(), {"messages": ["not a message"]}, tokenizer)
    assert e.code == CHAT_TEMPLATE_ERROR


# -- tokenizing -------------------------------------------------------------------------------


def test_tokenize_prompt_matches_the_tokenizer(tokenizer):
    text = "Write a short poem about the sea."
    assert tokenize_prompt(column_spec(), text, tokenizer) == tokenizer(text).input_ids
    chat = render_prompt(messages_spec(), {"messages": [{"role": "user", "content": "hi"}]}, tokenizer)
    assert tokenize_prompt(messages_spec(), chat, tokenizer) == tokenizer(chat, add_special_tokens=False).input_ids


def test_chat_prompts_get_no_second_set_of_special_tokens():
    # A tokenizer that adds a BOS token: the chat template already wrote its own.
    from tokenizers import processors

    tok = build_tokenizer()
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    text = "user: hi\nassistant:"
    assert tok(text).input_ids[0] == bos  # the tokenizer does add it when asked
    assert tokenize_prompt(column_spec(), text, tok)[0] == bos
    assert bos not in tokenize_prompt(messages_spec(), text, tok)


def test_build_prompt_leaves_room_for_one_new_token():
    tokenizer = build_tokenizer()
    spec = column_spec()
    row = {"prompt": "a b c d e f"}
    n = len(tokenize_prompt(spec, row["prompt"], tokenizer))
    text, ids = build_prompt(spec, row, tokenizer, context=n + 1)
    assert text == row["prompt"] and len(ids) == n
    with pytest.raises(RowError) as e:
        build_prompt(spec, row, tokenizer, context=n)
    assert e.value.code == PROMPT_TOO_LONG
    assert f"prompt is {n} tokens; the model's context is {n}" in str(e.value)
    assert build_prompt(spec, row, tokenizer, context=None)[1] == ids  # no context known: no limit


def test_max_new_tokens_takes_the_lowest_limit():
    spec = spec_from_dict(
        {
            "input": {"uri": "/in", "prompt_column": "prompt", "max_new_tokens_column": "limit"},
            "model": {"path": "org/model"},
            "generation": {"max_new_tokens": 50},
            "output": {"uri": "/out"},
        }
    )
    assert max_new_tokens(spec, {"limit": None}, prompt_tokens=10, context=None) == 50
    assert max_new_tokens(spec, {"limit": 7}, prompt_tokens=10, context=None) == 7
    assert max_new_tokens(spec, {"limit": 0}, prompt_tokens=10, context=None) == 1  # at least one token
    assert max_new_tokens(spec, {"limit": 500}, prompt_tokens=10, context=30) == 20  # the room left
