"""Checks done before any replica starts that need the model's files but not the model
(whether one replica fits the cluster is jobs/replica_plan.py's)."""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from pathlib import Path

from jobs.core import vllm_support
from jobs.core.errors import ModelError
from jobs.core.model import context_length
from jobs.core.spec import JobSpec

log = logging.getLogger(__name__)

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


def check_attn_implementation(spec: JobSpec) -> None:
    """model.attn_implementation must be a name transformers knows: "eager", one of its
    registered attention functions, or a hub kernel ("org/repo", checked when a replica loads it)."""
    name = spec.model.attn_implementation
    if name is None:
        return
    import transformers
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    # transformers still takes "paged|sdpa" and the like (deprecated), as the name after the prefix.
    if name in known or name.removeprefix("paged|") in known or is_kernel(name):
        return
    raise ModelError(
        f"model.attn_implementation {name!r} is not one transformers {transformers.__version__} knows; "
        f"use one of {known}, a hub kernel like 'kernels-community/flash-attn2', or leave it unset (sdpa, else eager)"
    )


def check_tokenizer(spec: JobSpec, tokenizer) -> None:
    if spec.input.messages_column and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"input.messages_column is set but the tokenizer of {spec.model.path!r} has no chat template; "
            "use prompt_column or prompt_template, or a chat model"
        )
    asked = [n for n, v in (("generation.structured", spec.generation.structured),
                            ("input.schema_column", spec.input.schema_column)) if v is not None]  # fmt: skip
    if asked and not getattr(tokenizer, "is_fast", False):
        # llguidance (both engines' grammars) reads the tokenizer's Rust serialization (tokenizer.json).
        raise ModelError(
            f"{asked[0]} needs a fast tokenizer (tokenizer.json); model.tokenizer "
            f"{spec.model.tokenizer or spec.model.path!r} is a slow one ({type(tokenizer).__name__})"
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


# Engine arguments the spec itself decides; an engine option must not contradict it.
_SPEC_OWNS = {"model": "model.path", "tokenizer": "model.tokenizer", "revision": "model.revision",
              "dtype": "model.dtype", "trust_remote_code": "model.trust_remote_code", "seed": "generation.seed",
              "structured_outputs_config": "generation.structured.whitespace"}


def check_engine(spec: JobSpec) -> None:
    """The engine can honour the spec, and model.engine_options are the engine's own argument names."""
    m = spec.model
    if m.engine == "transformers" and m.engine_options:
        raise ModelError(f"model.engine_options {sorted(m.engine_options)}: the transformers engine takes none")
    if m.engine == "transformers" and spec.resources.num_gpus > 1:
        raise ModelError(
            f"resources.num_gpus {spec.resources.num_gpus}: the transformers engine runs a replica on one GPU; "
            "use model.engine: vllm for tensor parallelism, or more replicas of one GPU each"
        )
    if m.engine == "vllm" and (reason := vllm_support.refuses(spec)):
        raise ModelError(f"model.engine is vllm, but {reason}")
    owned = sorted(k for k in m.engine_options if k in _SPEC_OWNS)
    if owned:
        raise ModelError(f"model.engine_options.{owned[0]}: set {_SPEC_OWNS[owned[0]]} in the spec instead")
    if not m.engine_options:
        return
    if not vllm_support.installed():
        log.warning("vLLM is not installed here: model.engine_options are checked by the replicas")
        return
    import dataclasses

    from vllm import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in sorted(set(m.engine_options) - known):
        hint = difflib.get_close_matches(name, known, n=1)
        raise ModelError(
            f"model.engine_options.{name}: vLLM's EngineArgs has no such argument"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
