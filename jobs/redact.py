"""Keep credentials out of every log: a logging.Filter that redacts them from records.

botocore, s3fs, aiobotocore and urllib3 log request headers, signed requests
and the credentials they resolved at DEBUG level (an S3 session token showed
up 182 times in one `--log-level debug` run). The filter goes on handlers,
not loggers, because a logger's filters do not see what its children
propagate; the CLI's console handler and the driver's run log (jobs/run_log.py)
both carry it.

Two nets: the values themselves (the credential environment variables and
every storage option value `remember` was given), and the places credentials
sit in the storage libraries' messages whatever their value (a signature's
Credential=, a security token header, key=/secret=/token= keyword arguments).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

REDACTED = "<redacted>"
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "HF_TOKEN", "RAY_AUTH_TOKEN",
)  # fmt: skip
MIN_SECRET_LEN = 6  # shorter values ("1", "us") are options, and redacting them would garble every line

# Where credentials appear in botocore/s3fs/urllib3 messages: headers, signed requests, kwargs.
_PATTERNS = [
    re.compile(r"(Credential=)([^/,\s'\"]+)"),
    re.compile(r"(Signature=)([0-9a-fA-F]+)"),
    re.compile(r"(x-amz-(?:security-token|credential)['\"]?\s*[:=]\s*b?['\"]?)([^'\"\s,&}]+)", re.IGNORECASE),
    re.compile(r"(\b(?:aws_access_key_id|aws_secret_access_key|aws_session_token|secret|token|key|password|"
               r"account_key|sas_token|connection_string)['\"]?\s*[:=]\s*b?['\"])([^'\"]+)"),
]

_remembered: set[str] = set()


def remember(options: dict | None) -> None:
    """Redact every string value of these storage options (nested ones too) from now on."""
    _remembered.update(_strings(options or {}))


def redact(text: str) -> str:
    """`text` with every known credential and every credential-shaped field replaced."""
    secrets = _remembered | {v for name in SECRET_ENV if (v := os.environ.get(name))}
    for secret in sorted((s for s in secrets if len(s) >= MIN_SECRET_LEN), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and traceback) with its credentials redacted; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(handlers: Iterable[logging.Handler]) -> None:
    """Give each handler the filter (once)."""
    for handler in handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
