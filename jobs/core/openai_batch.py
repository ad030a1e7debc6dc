"""The OpenAI batch file format: request lines in, provider-shaped response lines out.

The input is the JSONL file that OpenAI's (and other providers') batch APIs and
`vllm run-batch` take, one request a line:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "n": 2}}

A row is a non-blank line (jobs/core/rows.py reads them, with their line
numbers). Its request is parsed here, on the replica and in the driver's scan
alike: `body.messages` is a chat prompt rendered with the chat template,
`body.prompt` a completion prompt, and the request's own n, max_tokens,
temperature, top_p, stop and seed override the spec's generation defaults. A
line that does not parse is a dead letter (error code bad_request, its line
number in the message), never a failed job. Fields that would change the text
and that bulkgen cannot honour (tools, logprobs, penalties, ...) are refused
the same way rather than ignored.

The output side turns a request's rows (all n samples) into one line of the
providers' output file, its body a ChatCompletion or Completion object with
every choice and `usage`, or into one line of their error file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from jobs.core import prompts
from jobs.core.prompts import RowError
from jobs.core.spec import InputSpec

BAD_REQUEST = "bad_request"  # the error code of a line that is not a request bulkgen can run
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_N = 128  # OpenAI's own limit on n: one line must not ask for unbounded work

# The two prompt sources a line can be, judged by the same code as a Parquet input's columns.
_CHAT_SOURCE = InputSpec(uri="-", messages_column="messages")
_COMPLETION_SOURCE = InputSpec(uri="-", prompt_column="prompt")

# Body fields that change nothing bulkgen writes (who asked, where to store, which model: the spec's runs,
# unless body.model names one of its adapters).
_INFORMATIONAL = frozenset({"model", "user", "metadata", "store", "service_tier", "stream_options"})
# Fields bulkgen does not implement, accepted only at the value that turns them off.
_OFF_ONLY = {"stream": False, "logprobs": False, "top_logprobs": 0, "echo": False, "best_of": 1,
             "presence_penalty": 0, "frequency_penalty": 0, "suffix": None}  # fmt: skip
_GENERATION = frozenset({"n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed"})


@dataclass(frozen=True)
class BatchRequest:
    """One line, parsed. None means: the spec's generation setting."""

    custom_id: str
    url: str  # CHAT or COMPLETIONS: the prompt source and the response object
    messages: list[dict] | None  # chat: [{role, content}] with text content
    prompt: str | None  # completions
    n: int | None = None
    max_tokens: int | None = None
    seed: int | None = None  # replaces the job seed in the sequence's seed
    # Overrides of the engine's sampling parameters, by their names there
    # (do_sample, temperature, top_p, top_k, stop); empty: the job's own.
    sampling: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # body.model: one of model.adapters picks that adapter (workers/stages/adapter.py)


def parse_request(text: str, line: int) -> BatchRequest:
    """Parse and check one line; raises RowError(bad_request) naming the line and the field."""

    def bad(message: str) -> RowError:
        return RowError(BAD_REQUEST, f"line {line}: {message}")

    try:
        doc = json.loads(text, parse_constant=_not_json_constant)
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad(f"expected an object with custom_id, method, url and body, got {type(doc).__name__}")
    custom_id = doc.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise bad(f"custom_id must be a non-empty string, got {custom_id!r}")
    if doc.get("method", "POST") != "POST":
        raise bad(f"method must be POST, got {doc.get('method')!r}")
    url = doc.get("url")
    if url not in (CHAT, COMPLETIONS):
        raise bad(f"url {url!r} is not supported; use {CHAT} or {COMPLETIONS}")
    body = doc.get("body")
    if not isinstance(body, dict):
        raise bad("body is missing" if body is None else f"body must be an object, got {type(body).__name__}")
    source = "messages" if url == CHAT else "prompt"
    if source not in body:
        other = "prompt" if url == CHAT else "messages"
        hint = f" (body.{other} belongs to {COMPLETIONS if url == CHAT else CHAT})" if other in body else ""
        raise bad(f"body.{source} is missing for url {url}{hint}")
    for key, value in body.items():
        if key in _GENERATION or key in _INFORMATIONAL or key == source:
            continue
        if key in _OFF_ONLY and value in (None, _OFF_ONLY[key]):
            continue
        raise bad(f"body.{key} is not supported by bulkgen (got {value!r})")
    try:
        messages = _messages(body["messages"]) if url == CHAT else None
        prompt = _text(body["prompt"], "prompt") if url == COMPLETIONS else None
        settings = _generation(body)
    except ValueError as e:
        raise bad(str(e)) from None
    model = body.get("model")
    return BatchRequest(custom_id, url, messages, prompt, **settings, model=model if isinstance(model, str) else None)


def _not_json_constant(name: str):
    # Python's json reads NaN, Infinity and -Infinity; JSON has no such numbers, and a NaN
    # temperature would pass every range check (NaN compares false) and sample at random.
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity); write a finite number")


def _messages(value: Any) -> list[dict]:
    """[{role, content}] with text content; a list of text parts is joined as vLLM joins them."""
    if not isinstance(value, list):
        raise ValueError(f"body.messages must be a list, got {type(value).__name__}")
    messages = []
    for i, m in enumerate(value):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{where} must be an object with a string role, got {m!r}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"{where}.content holds {part!r}; only text parts are supported")
                parts.append(part["text"])
            content = "\n".join(parts)
        messages.append({"role": m["role"], "content": _text(content, f"{where}.content")})
    return messages


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"body.{name.removeprefix('body.')} must be a string, got {type(value).__name__}")
    return value


def _generation(body: dict) -> dict:
    """The request's own generation settings, checked; absent or null ones are left to the spec."""
    got = {k: v for k, v in body.items() if k in _GENERATION and v is not None}
    settings: dict[str, Any] = {"sampling": {}}
    if "n" in got:
        settings["n"] = _integer(got, "n", 1, MAX_N)
    # max_completion_tokens is the newer name of max_tokens (chat); it wins when both are given.
    for name in ("max_tokens", "max_completion_tokens"):
        if name in got:
            settings["max_tokens"] = _integer(got, name, 1)
    if "seed" in got:
        settings["seed"] = _integer(got, "seed")
    sampling = settings["sampling"]
    if "temperature" in got:
        temperature = _number(got, "temperature", 0.0)
        # OpenAI's meaning: 0 is greedy, anything above samples at that temperature.
        if temperature > 0:
            sampling.update(do_sample=True, temperature=temperature)
        else:
            sampling["do_sample"] = False
    if "top_p" in got:
        top_p = _number(got, "top_p", 0.0, 1.0)
        if top_p == 0:
            raise ValueError("body.top_p must be above 0")
        sampling["top_p"] = top_p
    if "top_k" in got:  # vLLM's extension; -1 (vLLM) and 0 (transformers) both turn it off
        sampling["top_k"] = max(0, _integer(got, "top_k", -1))
    if "stop" in got:
        stop = got["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"body.stop must be a non-empty string or a list of them, got {got['stop']!r}")
        sampling["stop"] = tuple(stop)
    return settings


def _integer(got: dict, name: str, low: int | None = None, high: int | None = None) -> int:
    value = got[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"body.{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"body.{name} must be in [{low}, {high if high is not None else '...'}], got {value}")
    return value


def _number(got: dict, name: str, low: float, high: float | None = None) -> float:
    value = got[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"body.{name} must be a finite number, got {value!r}")  # 1e400 reads as inf
    if value < low or (high is not None and value > high):
        raise ValueError(f"body.{name} must be in [{low}, {high if high is not None else '...'}], got {value}")
    return float(value)


# -- a row's request, as the replica and the driver's scan see it ------------------------


def request_of(row: dict) -> BatchRequest | None:
    """The row's parsed request, or None for a line that does not parse (a dead letter)."""
    try:
        return parse_request(row["request"], row["line"])
    except RowError:
        return None


def samples(row: dict, default: int) -> int:
    """How many sequences a row asks for: its n, else the spec's; one for a line that does not
    parse (its one dead letter). The driver's count of output rows and the replica agree on it."""
    request = request_of(row)
    if request is None:
        return 1
    return request.n or default


def build_prompt(row: dict, tokenizer, context: int | None) -> tuple[str, list[int]]:
    """(prompt text, token ids) for a batch row, or RowError: chat or completion, decided by its line."""
    request = parse_request(row["request"], row["line"])
    if request.url == CHAT:
        return prompts.build_prompt(_CHAT_SOURCE, {"messages": request.messages}, tokenizer, context)
    return prompts.build_prompt(_COMPLETION_SOURCE, {"prompt": request.prompt}, tokenizer, context)


# -- output lines ------------------------------------------------------------------------


def _digest(salt: str, custom_id: str) -> str:
    # Deterministic ids: finalizing a job again writes the same lines.
    return hashlib.sha256(f"{salt}\x00{custom_id}".encode()).hexdigest()[:24]


def response_line(
    custom_id: str, url: str, choices: list[dict], prompt_tokens: int, model: str, fingerprint: str, created: int
) -> dict:
    """One line of output.jsonl: a request's every sample as the provider's response object.

    `choices`: {sample_index, text, finish_reason, completion_tokens}, one per sample."""
    digest = _digest(fingerprint, custom_id)
    completion_tokens = sum(c["completion_tokens"] for c in choices)
    if url == CHAT:
        kind, prefix = "chat.completion", "chatcmpl"
        shaped = [
            {"index": c["sample_index"], "message": {"role": "assistant", "content": c["text"]},
             "logprobs": None, "finish_reason": c["finish_reason"]}
            for c in choices
        ]  # fmt: skip
    else:
        kind, prefix = "text_completion", "cmpl"
        shaped = [
            {"index": c["sample_index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
            for c in choices
        ]
    body = {
        "id": f"{prefix}-{digest}",
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,  # the job spec's: what decided this text
        "choices": sorted(shaped, key=lambda c: c["index"]),
        # A prompt is counted once for all its choices, as the providers count it.
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }  # fmt: skip
    return {
        "id": f"batch_req_{digest}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{digest}", "body": body},
        "error": None,
    }


def error_line(custom_id: str | None, code: str, message: str, line: int | None, fingerprint: str, key: str) -> dict:
    """One line of errors.jsonl. `custom_id` is None for a line whose custom_id cannot be read;
    `key` (its row id) keeps the line's own id distinct then."""
    return {
        "id": f"batch_req_{_digest(fingerprint, key)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "param": None, "line": line},
    }
