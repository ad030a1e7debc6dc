"""A thinking model's completion, split into its reasoning and its answer.

`generation.reasoning` names the tags (or `auto`: resolve finds them in the
tokenizer's chat template or vocabulary); the driver's preflight and each
replica resolve them with the same function from the same tokenizer files.
split mirrors vLLM 0.32's BaseThinkingReasoningParser.extract_reasoning
(vllm/reasoning/basic_parsers.py) on the generated token ids, so both engines
split alike, with one difference on purpose: a completion with neither tag,
whose prompt did not open the thinking either, has no reasoning (vLLM calls it
all reasoning), as Qwen3 with thinking off writes no tags at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs.core.errors import ModelError

if TYPE_CHECKING:
    from jobs.core.spec import ModelSpec, ReasoningTags


@dataclass(frozen=True)
class Tags:
    start: str  # opens the thinking, e.g. <think>
    end: str  # closes it, e.g. </think>


# The pairs vLLM 0.32's reasoning parsers know (vllm/reasoning/), most common first: what `auto` looks for.
KNOWN_TAGS = (
    Tags("<think>", "</think>"),  # deepseek_r1, qwen3, glm45, minimax_m2, olmo3, ...
    Tags("<seed:think>", "</seed:think>"),  # seed_oss
    Tags("<mm:think>", "</mm:think>"),  # minimax
    Tags("[THINK]", "[/THINK]"),  # mistral
    Tags("<|START_THINKING|>", "<|END_THINKING|>"),  # cohere_command
)


def resolve(chat_template: str | Mapping[str, str] | None, vocab: Mapping[str, int]) -> Tags | None:
    """The tags of a tokenizer, for `reasoning: auto`: the first known pair its chat template writes
    a tag of (a template that opens the thinking in the prompt writes only the start tag; a
    tokenizer may have several named templates); else the first pair whose two tags are single
    tokens of `vocab` (tokenizer.get_vocab()); else None."""
    templates = chat_template.values() if isinstance(chat_template, Mapping) else [chat_template or ""]
    for tags in KNOWN_TAGS:
        if any(tags.start in t or tags.end in t for t in templates):
            return tags
    for tags in KNOWN_TAGS:
        if tags.start in vocab and tags.end in vocab:
            return tags
    return None


def job_tags(setting: ReasoningTags | str, model: ModelSpec, tokenizer) -> Tags:
    """The tags of a job whose generation.reasoning is `setting` (not off): those it gives, or for
    `auto` those the tokenizer shows. Validation and every replica ask, of the same tokenizer files."""
    if setting != "auto":
        return Tags(setting.start, setting.end)
    tags = resolve(getattr(tokenizer, "chat_template", None), tokenizer.get_vocab())
    if tags is None:
        known = ", ".join(f"{t.start}…{t.end}" for t in KNOWN_TAGS)
        raise ModelError(
            f"generation.reasoning is auto, but the tokenizer of {model.tokenizer or model.path!r} shows no "
            f"thinking tags (looked for {known} in its chat template and vocabulary); "
            "give them as {start, end} or set reasoning: off"
        )
    return tags


@dataclass(frozen=True)
class TagIds:
    """The tags' token ids, where a tag is one token of the vocabulary; else None."""

    start: int | None
    end: int | None

    @classmethod
    def of(cls, tags: Tags, tokenizer) -> TagIds:
        def one(tag: str) -> int | None:
            token_id = tokenizer.convert_tokens_to_ids(tag)
            # A tag outside the vocabulary maps to the unknown token (or None where there is none).
            return None if token_id is None or token_id == tokenizer.unk_token_id else token_id

        return cls(one(tags.start), one(tags.end))


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # the thinking; None when the completion has none
    answer: str  # the text after the thinking, leading whitespace dropped
    reasoning_tokens: int  # generated tokens up to and including the end tag (all of them when it never came)


def split(
    token_ids: Sequence[int],
    tags: Tags,
    tag_ids: TagIds,
    decode: Callable[[Sequence[int]], str],
    prompt_text: str,
) -> Split:
    """Split a completion's tokens (EOS excluded) at the end tag.

    `decode` turns token ids into the completion's text as the engines do (special tokens
    skipped, cut at the first stop string); `prompt_text` is the rendered prompt, which may
    open the thinking itself (DeepSeek-R1's template ends with <think>). Where the end tag
    is one token it is found among the ids: a special token vanishes from decoded text.
    Else it is found in the decoded text, and the tokens up to it by bisection."""
    ids = list(token_ids)
    if tag_ids.end is not None and tag_ids.end in ids:
        e = ids.index(tag_ids.end)
        thinking = ids[:e]
        if tag_ids.start is not None and tag_ids.start in thinking:
            thinking = thinking[thinking.index(tag_ids.start) + 1 :]
        return Split(decode(thinking), decode(ids[e + 1 :]).lstrip(), e + 1)

    text = decode(ids)
    before, found, after = text.partition(tags.end)
    if found:
        return Split(_after_start(before, tags.start), after.lstrip(), _tokens_until(ids, tags.end, decode))

    # No end tag: thinking that never closed (cut by max_new_tokens), or no thinking at all.
    if tag_ids.start is not None and tag_ids.start in ids:
        return Split(decode(ids[ids.index(tag_ids.start) + 1 :]), "", len(ids))
    if tags.start in text or prompt_text.rstrip().endswith(tags.start):
        return Split(_after_start(text, tags.start), "", len(ids))
    return Split(None, text, 0)


def _after_start(text: str, start: str) -> str:
    """The thinking: what follows the start tag, when the text holds one (as vLLM's partition)."""
    head, found, tail = text.partition(start)
    return tail if found else head


def _tokens_until(ids: list[int], end: str, decode: Callable[[Sequence[int]], str]) -> int:
    """The fewest leading tokens whose text holds `end` (it is in the text of all of them):
    a longer prefix's text extends a shorter one's, so the test is monotone."""
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        if end in decode(ids[:mid]):
            high = mid
        else:
            low = mid + 1
    return low
