"""`--storage-option KEY=VALUE`: the output's fsspec storage options on the command line.

The operators' commands (status, logs, cancel, report, resume, retry-failed)
read an output before anything else, and on object storage the options may
be what reaches it (an endpoint, a profile, credentials). Keys nest with dots
(client_kwargs.endpoint_url=http://host:9000); values are YAML scalars as in
Ray's and fsspec's command lines (true, 3, null), except that text stays as
written (a secret with ` #` in it is not cut at a YAML comment).
"""

from __future__ import annotations

import json

import yaml

from jobs.core.errors import SpecError

FLAG = "--storage-option"
OUTPUT_OPTIONS = "output.storage_options"


def parse(items: list[str]) -> dict:
    """Nested storage options from KEY=VALUE items; SpecError (exit 2) naming a malformed one."""
    options: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise SpecError(f"{FLAG} {item!r}: expected KEY=VALUE, e.g. client_kwargs.endpoint_url=http://host:9000")
        node = options
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"{FLAG} {item!r}: {part} was given a value above, it cannot also hold keys")
        node[parts[-1]] = _value(raw, item)
    return options


def output_options(base: dict, overrides: list[str]) -> dict:
    """`base` with the overrides (`--set`) that name output.storage_options applied, in order."""
    from jobs.core.spec import apply_overrides

    ours = [o for o in overrides if o.partition("=")[0] == OUTPUT_OPTIONS
            or o.partition("=")[0].startswith(OUTPUT_OPTIONS + ".")]  # fmt: skip
    data = apply_overrides({"output": {"storage_options": json.loads(json.dumps(base))}}, ours)
    options = data["output"]["storage_options"]
    if not isinstance(options, dict):
        raise SpecError(f"--set {OUTPUT_OPTIONS}: expected a mapping of options, got {options!r}")
    return options


def _value(raw: str, item: str):
    if not raw:
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise SpecError(f"{FLAG} {item!r}: the value is not valid YAML ({e}); quote it") from None
    if isinstance(value, str) and raw[0] not in "'\"":
        return raw  # text as written: YAML would drop a ` #...` tail as a comment
    return value
