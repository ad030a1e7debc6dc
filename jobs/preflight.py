"""Checks that need the model's files but not the model: done before any replica starts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jobs.core.errors import ModelError
from jobs.core.model import context_length
from jobs.core.spec import JobSpec

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_source(spec: JobSpec) -> None:
    """Raise if the model cannot possibly load: a missing local directory, or
    a directory without safetensors weights while pickle is not allowed."""
    path = spec.model.path
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if not os.path.exists(path):
        if looks_local:
            raise ModelError(f"model.path {path!r} does not exist")
        return  # a hub id; its loading errors come from the replica
    if not os.path.isdir(path):
        raise ModelError(f"model.path {path!r} is a file; give the checkpoint's directory")
    files = [p.name for p in Path(path).iterdir()]
    if "config.json" not in files:
        raise ModelError(f"model.path {path!r} has no config.json; is it a transformers checkpoint?")
    if spec.model.use_safetensors and not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
            raise ModelError(
                f"model.path {path!r} has only pickle weights (.bin/.pt), which can run code when loaded; "
                "convert them to safetensors, or set model.use_safetensors: false if you trust the file"
            )
        raise ModelError(f"model.path {path!r} has no weight files")


def check_tokenizer(spec: JobSpec, tokenizer) -> None:
    if spec.input.messages_column and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
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


def check_model_loadable(spec: JobSpec) -> int | None:
    """Check config, architecture and weight headers without loading weights; returns the context length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = spec.model
    try:
        config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path {m.path!r}: cannot load its config: {e}") from e
    try:
        with torch.device("meta"):  # shapes and names only, no memory
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except ValueError as e:
        raise ModelError(f"model.path {m.path!r} is not a causal language model: {e}") from e
    _check_safetensors_headers(m.path, model)
    return context_length(config)


def _check_safetensors_headers(path: str, model) -> None:
    from safetensors import safe_open

    if not os.path.isdir(path):
        return  # a hub id: its files are checked when a replica downloads them
    stored: set[str] = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:  # reads the header only
                stored.update(st.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ModelError(f"model weights {f} are unreadable: {e}") from e
    if not stored:
        return
    # Older checkpoints (the original gpt2, say) store names without the base model prefix.
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    stored |= {f"{prefix}{n}" for n in stored}
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    expected = {name for name, _ in model.named_parameters()} - tied
    missing = sorted(expected - stored)
    if missing:
        raise ModelError(
            f"model weights in {path} lack {len(missing)} parameters the architecture needs, e.g. {missing[:3]}"
        )
