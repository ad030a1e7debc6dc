"""workers/grammar.py's masks against llguidance's own matcher, on the tiny byte-level BPE tokenizer:
the mask allows only tokens the grammar takes next, and a random walk under it always ends
in a completion of the constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from jobs.core.structured import Structured, canonical_json
from tests.tiny_model import build_tokenizer
from workers.grammar import Grammars

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["label", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA = Structured("json_schema", canonical_json(SCHEMA))
REGEX = Structured("regex", "[a-z]{3}-[0-9]{2}")
CHOICES = Structured("choice", ("yes", "no", "maybe so"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    # Logits 20 wider than the tokenizer: a model's padded embedding rows.
    return Grammars(tokenizer, len(tokenizer) + 20, flexible=False, threads=1)


def allowed(grammars, matcher, width: int) -> set[int]:
    logits = torch.zeros((1, width))
    grammars.mask(logits, [matcher])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def takes(matcher, token: int) -> bool:
    m = matcher.deep_copy()
    return m.consume_token(token)


def walk(grammars, s: Structured, seed: int, limit: int = 60) -> list[int]:
    """Tokens drawn at random under the mask until the grammar is complete, or EOS."""
    g = torch.Generator().manual_seed(seed)
    m = grammars.matcher(s)
    tokens: list[int] = []
    eos = grammars.tokenizer.eos_token
    for _ in range(limit):
        logits = torch.randn((1, grammars.tokenizer.vocab_size), generator=g)  # (1, V): the model's width
        grammars.mask(logits, [m])
        token = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=g))
        if token == eos:
            break
        tokens.append(token)
        if grammars.advance(m, token):
            break
    return tokens


@pytest.mark.parametrize("s", [JSON_SCHEMA, REGEX, CHOICES])
def test_the_mask_allows_only_what_the_grammar_takes(grammars, tokenizer, s):
    width = len(tokenizer) + 20
    m = grammars.matcher(s)
    for token in walk(grammars, s, seed=1)[:6]:  # at several states along a completion
        mask = allowed(grammars, m, width) - {tokenizer.eos_token_id}
        assert mask, "a grammar that is not complete allows some token"
        assert max(mask) < len(tokenizer)  # padded ids never
        # A subset, not always all: where the grammar forces bytes ("{\"label\":\""), llguidance
        # allows their canonical tokens only, not every token that spells a prefix of them.
        assert all(takes(m, t) for t in mask)
        grammars.advance(m, token)


@pytest.mark.parametrize("seed", range(4))
def test_a_walk_under_the_mask_satisfies_the_schema(grammars, tokenizer, seed):
    tokens = walk(grammars, JSON_SCHEMA, seed)
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)
    assert grammars.satisfied(JSON_SCHEMA, tokens) == (True, "")


def test_regex_and_choices_are_whole_matches(grammars, tokenizer):
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", tokenizer.decode(walk(grammars, REGEX, seed=0)))
    assert {tokenizer.decode(walk(grammars, CHOICES, seed=s)) for s in range(12)} <= set(CHOICES.value)


def test_eos_is_allowed_only_where_the_completion_could_end(grammars, tokenizer):
    eos = tokenizer.eos_token_id
    m = grammars.matcher(Structured("regex", "[0-9]+"))
    assert eos not in allowed(grammars, m, len(tokenizer))
    grammars.advance(m, tokenizer.convert_tokens_to_ids("7"))
    assert eos in allowed(grammars, m, len(tokenizer))  # "7" is whole, and "77" would be too


def test_a_completed_grammar_says_so(grammars, tokenizer):
    m = grammars.matcher(Structured("choice", ("yes", "no")))
    ids = tokenizer("no", add_special_tokens=False).input_ids
    assert [grammars.advance(m, t) for t in ids][-1] is True
    assert allowed(grammars, m, len(tokenizer)) == {tokenizer.eos_token_id}


def test_unconstrained_rows_keep_their_logits(grammars, tokenizer):
    logits = torch.randn((3, len(tokenizer)))
    before = logits.clone()
    grammars.mask(logits, [None, grammars.matcher(REGEX), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isinf(logits[1]).sum() > 0 and not torch.equal(logits[1], before[1])
    grammars.mask(logits, [None, None, None])  # nothing constrained: nothing to compute


def test_a_refused_token_is_an_error_not_a_silent_row(grammars, tokenizer):
    m = grammars.matcher(Structured("regex", "[0-9]+"))
    with pytest.raises(RuntimeError, match="the grammar refused a token its own mask allowed"):
        grammars.advance(m, tokenizer.convert_tokens_to_ids("a"))


def test_satisfied_tells_incomplete_from_invalid(grammars, tokenizer):
    tokens = walk(grammars, JSON_SCHEMA, seed=0)
    assert grammars.satisfied(JSON_SCHEMA, tokens[:-1]) == (False, "")  # a prefix: not yet whole
    ok, why = grammars.satisfied(REGEX, tokenizer("ABC", add_special_tokens=False).input_ids)
    assert not ok and why


def test_matchers_are_fresh_copies_of_one_compiled_grammar(grammars, tokenizer):
    first, second = grammars.matcher(REGEX), grammars.matcher(REGEX)
    grammars.advance(first, tokenizer.convert_tokens_to_ids("a"))
    assert allowed(grammars, second, len(tokenizer)) != allowed(grammars, first, len(tokenizer))
    with pytest.raises(ValueError, match="llguidance cannot use this constraint"):
        grammars.matcher(Structured("regex", "a(b"))
