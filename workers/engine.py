"""The engine interface: all the replica asks of a generation engine.

An engine turns token-id requests into completions on one model replica. It
knows nothing of shards, rows or storage; the replica's EngineLoop feeds it
from every shard in flight. The transformers engine implements it
(workers/transformers_engine.py), and so does vLLM's
(workers/vllm_engine.py); the replica does not know which one it runs
(workers/engine_factory.py chooses it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from jobs.core.spec import GenerationSpec
    from jobs.core.structured import Structured

# Greedy decoding in float32: both engines' per-token logprobs agree within this (README,
# "Log-probabilities"); in bf16/fp16 the kernels differ more and tokens may diverge.
LOGPROB_TOLERANCE = 1e-3
TopLogprobs = tuple[tuple[int, float], ...]  # one step's (token id, logprob), most likely first, finite only


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, gen: GenerationSpec) -> SamplingParams:
        return cls(
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.do_sample,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            stop=gen.stop,
        )


@dataclass(frozen=True)
class Request:
    key: object  # the caller's handle for this sequence (hashable)
    prompt_ids: tuple[int, ...]
    seed: int  # seeds this sequence's own generator
    max_new_tokens: int  # may be below the job's, where the context is short
    # This sequence's own sampling (a batch request's temperature, top_p, stop, ...);
    # None: the engine's job-wide parameters.
    params: SamplingParams | None = None
    structured: Structured | None = None  # the completion must satisfy it (generation.structured)
    logprobs: int | None = None  # None: none; 0: the chosen tokens' logprobs; K: and each step's top K
    adapter: str | None = None  # one of the job's adapters (model.adapters); None: the base model


@dataclass(frozen=True)
class Completion:
    key: object
    token_ids: tuple[int, ...]  # generated tokens, end-of-sequence token excluded
    text: str
    finish_reason: str  # "stop" (eos, stop string or a complete grammar) | "length" | "error"
    error: str | None = None  # why this one sequence could not be generated
    token_logprobs: tuple[float, ...] | None = None  # one per token_ids entry, when the request asked
    top_logprobs: tuple[TopLogprobs, ...] | None = None  # one per token_ids entry, when it asked for K > 0


def completion_text(tokenizer, token_ids, stop: tuple[str, ...]) -> str:
    """A completion's text: its tokens decoded whole, cut before the first stop string.
    Every engine returns this, so equal tokens always mean equal text."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


class FatalDeviceError(RuntimeError):
    """The accelerator is in a state no retry on this replica can fix (e.g. a CUDA error)."""


class Engine(Protocol):
    tokenizer: object  # renders and tokenizes prompts; decodes completions
    context_length: int | None  # most tokens (prompt + new) a sequence may hold

    def submit(self, requests: Iterable[Request]) -> None:
        """Queue requests; they are admitted as the engine's budgets allow."""

    def has_work(self) -> bool:
        """Whether any request is queued or running."""

    def step(self) -> list[Completion]:
        """Advance every running sequence; return those that finished (one per request, errors included).
        Raises FatalDeviceError when the device is lost for good."""

    def abort_all(self) -> list[Request]:
        """Drop every queued and running request (after an unexpected error); returns them."""

    def stats(self) -> dict[str, int]:
        """Cumulative counters (tokens computed, steps, ...) for the job record and the benchmark."""

    def describe(self) -> dict:
        """Facts for the job record: engine name and version, device, dtype, model revision."""


def generate(engine: Engine, requests: Iterable[Request]) -> list[Completion]:
    """Complete every request on an idle engine, in the requests' order (no other caller)."""
    requests = list(requests)
    engine.submit(requests)
    done: dict = {}
    while engine.has_work():
        for c in engine.step():
            done[c.key] = c
    return [done[r.key] for r in requests]
