"""Bad input: the one family of errors that the CLI reports as exit 2.

Anything else that escapes a command is an internal error (a bug, or
storage that failed for good): exit 1, with its traceback in the log.
"""

from __future__ import annotations


class BadInput(ValueError):
    """The user's spec, data, model, output or cluster address cannot work; the message says why and what to do."""


class SpecError(BadInput):
    """A job spec that cannot run; the message names every offending field."""


class InputError(BadInput):
    """The input dataset: missing files, unreadable Parquet, missing columns, wrong types, duplicate ids."""


class ModelError(BadInput):
    """The model or its tokenizer cannot load, or cannot serve this spec."""


class OutputError(BadInput):
    """The output location cannot be used: unreachable, a file, inside the input, another job's results."""


class ClusterError(BadInput):
    """The Ray cluster named by --address (or RAY_ADDRESS) cannot be joined."""


class InputChanged(InputError):
    """The input differs from the one the job in this output was planned on (jobs/snapshot.py)."""
