"""Checks that need the model's files but not the model: done before any replica starts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jobs.spec import JobSpec

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_source(spec: JobSpec) -> None:
    """Raise if the model cannot possibly load: a missing local directory, or
    a directory without safetensors weights while pickle is not allowed."""
    path = spec.model.path
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if not os.path.exists(path):
        if looks_local:
            raise FileNotFoundError(f"model.path {path!r} does not exist")
        return  # a hub id; its loading errors come from the replica
    if not os.path.isdir(path):
        raise ValueError(f"model.path {path!r} is a file; give the checkpoint's directory")
    files = [p.name for p in Path(path).iterdir()]
    if "config.json" not in files:
        raise FileNotFoundError(f"model.path {path!r} has no config.json; is it a transformers checkpoint?")
    if spec.model.use_safetensors and not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
            raise ValueError(
                f"model.path {path!r} has only pickle weights (.bin/.pt), which can run code when loaded; "
                "convert them to safetensors, or set model.use_safetensors: false if you trust the file"
            )
        raise FileNotFoundError(f"model.path {path!r} has no weight files")


def load_tokenizer(spec: JobSpec):
    from transformers import AutoTokenizer

    m = spec.model
    try:
        return AutoTokenizer.from_pretrained(
            m.tokenizer or m.path, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {m.tokenizer or m.path!r}: {e}") from e


def check_tokenizer(spec: JobSpec, tokenizer) -> None:
    if spec.input.messages_column and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"input.messages_column is set but the tokenizer of {spec.model.path!r} has no chat template; "
            "use prompt_column or prompt_template, or a chat model"
        )


def model_identity(spec: JobSpec) -> dict:
    """Model id plus revision, and for a local checkpoint a hash of its weight files."""
    identity = {"path": spec.model.path, "revision": spec.model.revision, "dtype": spec.model.dtype}
    if os.path.isdir(spec.model.path):
        digest = hashlib.sha256()
        for p in sorted(Path(spec.model.path).iterdir()):
            if p.name.endswith(_WEIGHT_SUFFIXES):
                digest.update(p.name.encode())
                with p.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
        identity["weights_sha256"] = digest.hexdigest()
    return identity
