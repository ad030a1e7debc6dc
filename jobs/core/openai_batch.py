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
number in the message), never a failed job. A line may also ask for
structured output (`response_format` json_schema or json_object, or vLLM's
`structured_outputs`), for logprobs (`logprobs`, `top_logprobs`) and pass
variables to the chat template (`chat_template_kwargs`, `reasoning_effort`).
Fields that would change the text and that bulkgen cannot honour (tools,
penalties, ...) are refused the same way rather than ignored.

The output side turns a request's rows (all n samples) into one line of the
providers' output file, its body a ChatCompletion or Completion object with
every choice and `usage` (logprobs, reasoning_content and reasoning_tokens where
the job kept them), or into one line of their error file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.core import prompts
from jobs.core.prompts import BAD_ENCODING, RowError
from jobs.core.rows import NOT_UTF8
from jobs.core.spec import InputSpec
from jobs.core.structured import Structured, canonical_json, problem

BAD_REQUEST = "bad_request"  # the error code of a line that is not a request bulkgen can run
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_N = 128  # OpenAI's own limit on n: one line must not ask for unbounded work
TOP_LOGPROBS_LIMITS = {CHAT: 20, COMPLETIONS: 5}  # OpenAI's limits: chat's top_logprobs, completions' legacy logprobs
NO_LOGPROB = -9999.0  # what OpenAI writes for a token the model could not choose (JSON has no -inf)
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
# chat_template_kwargs bulkgen sets itself when it renders the prompt.
# (apply_chat_template's own arguments: a line passing chat_template would replace the model's template.)
_TEMPLATE_OWN = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})  # fmt: skip

# The two prompt sources a line can be, judged by the same code as a Parquet input's columns.
_CHAT_SOURCE = InputSpec(uri="-", messages_column="messages")
_COMPLETION_SOURCE = InputSpec(uri="-", prompt_column="prompt")

# Body fields that change nothing bulkgen writes (who asked, where to store, which model: the spec's runs,
# unless body.model names one of its adapters).
_INFORMATIONAL = frozenset({"model", "user", "metadata", "store", "service_tier", "stream_options"})
# Fields bulkgen does not implement, accepted only at the value that turns them off.
_OFF_ONLY = {"stream": False, "echo": False, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "suffix": None}
_GENERATION = frozenset({"n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed"})
# What a line asks beyond the sampling settings: parsed by _extras.
_EXTRAS = frozenset({"response_format", "structured_outputs", "logprobs", "top_logprobs", "reasoning_effort",
                     "chat_template_kwargs"})  # fmt: skip


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
    structured: Structured | None = None  # response_format / structured_outputs; None: the job's
    unconstrained: bool = False  # response_format text: no constraint, whatever the job's
    # logprobs: the top K asked with them (0: the chosen tokens' only); None with logprobs_off
    # False: the line does not mention them (the job's generation.logprobs applies).
    logprobs: int | None = None
    logprobs_off: bool = False  # the line says logprobs: false
    model: str | None = None  # body.model: one of model.adapters picks that adapter (workers/stages/adapter.py)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat template variables

    def logprobs_for(self, job: int | None) -> int | None:
        """The top K this line's sequences keep logprobs with (None: none), given the job's."""
        if self.logprobs_off:
            return None
        return self.logprobs if self.logprobs is not None else job


def parse_request(text: str, line: int) -> BatchRequest:
    """Parse and check one line; raises RowError(bad_request) naming the line and the field
    (bad_encoding for a line that is not UTF-8)."""

    def bad(message: str) -> RowError:
        return RowError(BAD_REQUEST, f"line {line}: {message}")

    if text.startswith(NOT_UTF8):  # its text would be a guess: U+FFFD where bytes were lost
        raise RowError(
            BAD_ENCODING, f"line {line}: not valid UTF-8 (U+FFFD marks the bytes that are not); write the file as UTF-8"
        )

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
        if key in _GENERATION or key in _INFORMATIONAL or key in _EXTRAS or key == source:
            continue
        if key in _OFF_ONLY and value in (None, _OFF_ONLY[key]):
            continue
        raise bad(f"body.{key} is not supported by bulkgen (got {value!r})")
    try:
        messages = _messages(body["messages"]) if url == CHAT else None
        prompt = _text(body["prompt"], "prompt") if url == COMPLETIONS else None
        settings = _generation(body)
        settings.update(_extras(body, url))
    except ValueError as e:
        raise bad(str(e)) from None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return BatchRequest(custom_id, url, messages, prompt, model=model, **settings)


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


def _extras(body: dict, url: str) -> dict:
    """What the line asks beyond sampling: a constraint, logprobs, chat template variables."""
    extras: dict[str, Any] = {}
    structured = _response_format(body.get("response_format"))
    if body.get("structured_outputs") is not None:
        if body.get("response_format") is not None:
            raise ValueError("give body.response_format or body.structured_outputs, not both")
        structured = _structured_outputs(body["structured_outputs"])
    elif structured is None and body.get("response_format") is not None:  # type text: no constraint
        extras["unconstrained"] = True
    if structured is not None:
        if body.get("stop"):
            raise ValueError("body.stop could cut a structured answer short of its constraint; drop one")
        why = problem(structured)
        if why is not None:
            raise ValueError(f"body.{_constraint_field(body)}: llguidance cannot use it: {why}")
        extras["structured"] = structured
    extras.update(_logprobs(body, url))
    template_kwargs = body.get("chat_template_kwargs")
    if template_kwargs is not None:
        if url != CHAT:
            raise ValueError(f"body.chat_template_kwargs belongs to {CHAT}")
        if not isinstance(template_kwargs, dict):
            raise ValueError(f"body.chat_template_kwargs must be an object, got {type(template_kwargs).__name__}")
        for name in sorted(_TEMPLATE_OWN & template_kwargs.keys()):
            raise ValueError(f"body.chat_template_kwargs.{name} is bulkgen's to set")
        extras["template_kwargs"] = dict(template_kwargs)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if url != CHAT:
            raise ValueError(f"body.reasoning_effort belongs to {CHAT}")
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"body.reasoning_effort must be one of {list(REASONING_EFFORTS)}, got {effort!r}")
        # The chat template reads it under this name (gpt-oss, Qwen and others), as vLLM passes it.
        extras["template_kwargs"] = {**extras.get("template_kwargs", {}), "reasoning_effort": effort}
    return extras


def _response_format(value: Any) -> Structured | None:
    """OpenAI's response_format: text (no constraint), json_object or json_schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Structured("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("body.response_format.json_schema.schema must be an object")
        return Structured("json_schema", canonical_json(schema))
    raise ValueError(f"body.response_format.type {kind!r} is not supported; use text, json_object or json_schema")


def _structured_outputs(value: Any) -> Structured:
    """vLLM's structured_outputs extension: exactly one of json, regex, choice, json_object."""
    if not isinstance(value, dict):
        raise ValueError(f"body.structured_outputs must be an object, got {type(value).__name__}")
    for unsupported in ("grammar", "structural_tag"):
        if value.get(unsupported) is not None:
            raise ValueError(f"body.structured_outputs.{unsupported} is not supported by bulkgen")
    given = sorted(k for k in ("json", "regex", "choice", "json_object") if value.get(k) not in (None, False))
    if len(given) != 1:
        raise ValueError(f"body.structured_outputs must give one of json, regex, choice, json_object (got {given})")
    kind = given[0]
    if kind == "json":
        schema = value["json"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"body.structured_outputs.json is not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError("body.structured_outputs.json must be a JSON schema object")
        return Structured("json_schema", canonical_json(schema))
    if kind == "regex":
        if not isinstance(value["regex"], str) or not value["regex"]:
            raise ValueError("body.structured_outputs.regex must be a non-empty string")
        return Structured("regex", value["regex"])
    if kind == "choice":
        choice = value["choice"]
        if not (isinstance(choice, list) and choice and all(isinstance(c, str) and c for c in choice)):
            raise ValueError("body.structured_outputs.choice must be a non-empty list of non-empty strings")
        return Structured("choice", tuple(choice))
    if value["json_object"] is not True:
        raise ValueError("body.structured_outputs.json_object must be true")
    return Structured("json_object")


def _constraint_field(body: dict) -> str:
    return "response_format.json_schema.schema" if body.get("response_format") is not None else "structured_outputs"


def _logprobs(body: dict, url: str) -> dict:
    """Chat: logprobs (bool) and top_logprobs (K, needs logprobs); completions: logprobs (K)."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    limit = TOP_LOGPROBS_LIMITS[url]
    if url == COMPLETIONS:
        if top is not None:
            raise ValueError(f"body.top_logprobs belongs to {CHAT}; {COMPLETIONS} takes logprobs: K")
        if logprobs is None:
            return {}
        return {"logprobs": _integer({"logprobs": logprobs}, "logprobs", 0, limit)}
    if logprobs is None and top is None:
        return {}
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ValueError(f"body.logprobs must be true or false, got {logprobs!r}")
    k = _integer({"top_logprobs": top}, "top_logprobs", 0, limit) if top is not None else 0
    if not logprobs:
        if k:
            raise ValueError("body.top_logprobs needs body.logprobs: true")
        return {"logprobs_off": logprobs is False}
    return {"logprobs": k}


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
        messages = {"messages": request.messages}
        return prompts.build_prompt(_CHAT_SOURCE, messages, tokenizer, context, request.template_kwargs)
    return prompts.build_prompt(_COMPLETION_SOURCE, {"prompt": request.prompt}, tokenizer, context)


# -- output lines ------------------------------------------------------------------------


def _digest(salt: str, custom_id: str) -> str:
    # Deterministic ids: finalizing a job again writes the same lines.
    return hashlib.sha256(f"{salt}\x00{custom_id}".encode()).hexdigest()[:24]


def response_line(
    custom_id: str,
    url: str,
    choices: list[dict],
    prompt_tokens: int,
    model: str,
    fingerprint: str,
    created: int,
    token_of: TokenOf | None = None,
) -> dict:
    """One line of output.jsonl: a request's every sample as the provider's response object.

    `choices`: {sample_index, text, finish_reason, completion_tokens}, one per sample, and where the
    job kept them token_ids, token_logprobs, top_logprobs (data/'s columns) and reasoning,
    reasoning_tokens; `token_of`: a token id's text and bytes, needed when there are logprobs."""
    digest = _digest(fingerprint, custom_id)
    completion_tokens = sum(c["completion_tokens"] for c in choices)
    if url == CHAT:
        kind, prefix = "chat.completion", "chatcmpl"
        shaped = [
            {"index": c["sample_index"], "message": _message(c), "logprobs": _chat_logprobs(c, token_of),
             "finish_reason": c["finish_reason"]}
            for c in choices
        ]  # fmt: skip
    else:
        kind, prefix = "text_completion", "cmpl"
        shaped = [
            {"index": c["sample_index"], "text": c["text"], "logprobs": _completion_logprobs(c, token_of),
             "finish_reason": c["finish_reason"]}
            for c in choices
        ]  # fmt: skip
    # A prompt is counted once for all its choices, as the providers count it.
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    if any("reasoning_tokens" in c for c in choices):  # the job keeps the thinking apart
        usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.get("reasoning_tokens") or 0 for c in choices)}
    body = {
        "id": f"{prefix}-{digest}",
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,  # the job spec's: what decided this text
        "choices": sorted(shaped, key=lambda c: c["index"]),
        "usage": usage,
    }
    return {
        "id": f"batch_req_{digest}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{digest}", "body": body},
        "error": None,
    }


TokenOf = Callable[[int], tuple[str, list[int]]]  # a token id -> its text and its bytes


def _message(choice: dict) -> dict:
    message = {"role": "assistant", "content": choice["text"]}
    if "reasoning" in choice:  # the job keeps the thinking apart: the providers' (and DeepSeek's) field
        message["reasoning_content"] = choice["reasoning"]
    return message


def _answer_logprobs(choice: dict) -> tuple[list, list, list] | None:
    """(token ids, logprobs, top lists) of the answer's tokens (the thinking's are left out, as the
    providers do), or None when the sequence kept no logprobs."""
    if choice.get("token_logprobs") is None:
        return None
    skip = choice.get("reasoning_tokens") or 0
    ids, logprobs = choice["token_ids"][skip:], choice["token_logprobs"][skip:]
    tops = choice.get("top_logprobs")
    tops = tops[skip:] if tops is not None else [[] for _ in ids]
    return ids, logprobs, tops


def _chat_logprobs(choice: dict, token_of: TokenOf | None) -> dict | None:
    answer = _answer_logprobs(choice)
    if answer is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_of(token_id)
        return {"token": text, "bytes": raw, "logprob": _json_logprob(logprob)}

    content = [
        {**entry(t, lp), "top_logprobs": [entry(e["token_id"], e["logprob"]) for e in top]}
        for t, lp, top in zip(*answer)
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(choice: dict, token_of: TokenOf | None) -> dict | None:
    answer = _answer_logprobs(choice)
    if answer is None:
        return None
    ids, logprobs, tops = answer
    tokens = [token_of(t)[0] for t in ids]
    offsets = [0]
    for token in tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    return {
        "tokens": tokens,
        "token_logprobs": [_json_logprob(lp) for lp in logprobs],
        "top_logprobs": [{token_of(e["token_id"])[0]: _json_logprob(e["logprob"]) for e in top} for top in tops],
        "text_offset": offsets[: len(tokens)],
    }


def _json_logprob(logprob: float) -> float:
    return float(logprob) if math.isfinite(logprob) else NO_LOGPROB


def error_line(custom_id: str | None, code: str, message: str, line: int | None, fingerprint: str, key: str) -> dict:
    """One line of errors.jsonl. `custom_id` is None for a line whose custom_id cannot be read;
    `key` (its row id) keeps the line's own id distinct then."""
    return {
        "id": f"batch_req_{_digest(fingerprint, key)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "param": None, "line": line},
    }
