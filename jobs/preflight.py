"""Checks that need the model's files but not the model, done before any shard runs (the
security ones, check_model_source and check_adapters, before any replica loads the model)
(whether one replica fits the cluster is jobs/replica_plan.py's)."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from jobs.core import adapters, reasoning, vllm_support
from jobs.core.errors import ModelError
from jobs.core.model import context_length, missing_weights
from jobs.core.spec import JobSpec
from jobs.weights_cache import weights_sha256

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


def reads_tokenizer(spec: JobSpec) -> bool:
    """Whether check_tokenizer or check_reasoning can refuse `spec` (else loading the tokenizer
    checks only that it loads, which a replica does as it starts)."""
    g, i = spec.generation, spec.input
    return bool(i.messages_column or g.structured is not None or i.schema_column or g.reasoning == "auto")


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


def check_reasoning(spec: JobSpec, tokenizer) -> None:
    """`generation.reasoning: auto` needs tags the tokenizer shows; each replica resolves the same ones."""
    if spec.generation.reasoning == "auto":
        reasoning.job_tags("auto", spec.model, tokenizer)  # raises ModelError naming what it looked for


def model_identity(spec: JobSpec) -> dict:
    """Model id plus revision, and for a local checkpoint a hash of its weight files; its adapters,
    when the job has any (their hashes as the spec pinned them, rank and modules)."""
    identity = {"path": spec.model.path, "revision": spec.model.revision, "dtype": spec.model.dtype}
    if named := spec.model.adapter_set():
        identity["adapters"] = {name: _adapter_identity(a) for name, a in sorted(named.items())}
    if os.path.isdir(spec.model.path):
        weights = [p for p in sorted(Path(spec.model.path).iterdir()) if p.name.endswith(_WEIGHT_SUFFIXES)]
        identity["weights_sha256"] = weights_sha256(weights)  # cached by file version (jobs/weights_cache.py)
    return identity


def _adapter_identity(adapter) -> dict:
    config = adapters.read_config(adapter.path)
    return {"path": adapter.path, "sha256": adapter.sha256, "r": adapters.rank(config),
            "target_modules": config.get("target_modules")}  # fmt: skip


def check_model_loadable(spec: JobSpec) -> int | None:
    """Check config, architecture and weight headers without loading weights; returns the context length."""
    config, model = _meta_model(spec)
    _check_safetensors_headers(spec.model.path, model)
    return context_length(config)


def _meta_model(spec: JobSpec):
    """(config, the model built on the meta device: its modules' names and shapes, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = spec.model
    try:
        config = AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path {m.path!r}: cannot load its config: {e}") from e
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except ValueError as e:
        raise ModelError(f"model.path {m.path!r} is not a causal language model: {e}") from e
    return config, model


def check_adapters(spec: JobSpec) -> None:
    """Every adapter is a local PEFT LoRA directory whose weights are safetensors (unless pickle
    is allowed), has the files the spec pinned, and fits the base model: each module it adapts
    exists there with the inputs and outputs its factors expect (read from the weights' header)."""
    named = spec.model.adapter_set()
    if not named:
        return
    _, model = _meta_model(spec)
    modules = dict(model.named_modules())
    for name, adapter in sorted(named.items()):
        field, path = spec.model.adapter_field(name), adapter.path
        if not os.path.isfile(os.path.join(path, adapters.CONFIG)):
            raise ModelError(
                f"{field}: {path} is no PEFT adapter directory (no {adapters.CONFIG}); save one with save_pretrained"
            )
        try:
            config = adapters.read_config(path)
        except ValueError as e:
            raise ModelError(f"{field}: {path}/{adapters.CONFIG} is unreadable: {e}") from e
        if config.get("peft_type") != "LORA":
            raise ModelError(f"{field}: {path} is a {config.get('peft_type')} adapter; only LoRA adapters are supported")
        if config.get("use_dora"):
            raise ModelError(f"{field}: {path} uses DoRA, which neither vLLM 0.32 nor PEFT's mixed-adapter batches run")
        weights = adapters.weight_file(path)
        if weights is None:
            raise ModelError(f"{field}: {path} has no adapter weights ({adapters.SAFETENSORS})")
        if weights.name == adapters.PICKLE and spec.model.use_safetensors:
            raise ModelError(
                f"{field}: {path} has only pickle weights ({adapters.PICKLE}), which can run code when loaded; "
                "save it again with safetensors, or set model.use_safetensors: false if you trust the file"
            )
        digest = adapters.files_sha256(path)
        if adapter.sha256 is not None and digest != adapter.sha256:
            raise ModelError(
                f"{field}: {path}'s files' sha256 is {digest}, the spec pins {adapter.sha256}: the adapter changed"
            )
        if weights.name == adapters.SAFETENSORS:
            shapes = adapters.lora_shapes(weights)
            if problem := adapters.misfit(shapes, {n: _inputs_outputs(modules[n]) for n in shapes if n in modules}):
                raise ModelError(f"{field} does not fit model.path {spec.model.path!r}: {problem}")
        trained_on = config.get("base_model_name_or_path")
        if trained_on and trained_on != spec.model.path:  # paths differ across machines: the shapes decide
            log.info("%s was trained on %s; the job runs it on %s", field, trained_on, spec.model.path)


def _inputs_outputs(module) -> tuple[int, int] | None:
    """A module's (inputs, outputs) as LoRA factors see them; None for a kind LoRA does not adapt."""
    if hasattr(module, "in_features"):  # nn.Linear
        return module.in_features, module.out_features
    if hasattr(module, "num_embeddings"):  # nn.Embedding
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed Linear: weight [in, out]
        return tuple(module.weight.shape)
    return None


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
    if missing := expected - stored:
        raise missing_weights(path, missing)


# Engine arguments the spec itself decides; an engine option must not contradict it.
_SPEC_OWNS = {"model": "model.path", "tokenizer": "model.tokenizer", "revision": "model.revision",
              "dtype": "model.dtype", "trust_remote_code": "model.trust_remote_code", "seed": "generation.seed",
              "structured_outputs_config": "generation.structured.whitespace",
              "logprobs_mode": "generation.logprobs",  # raw_logprobs: what the transformers engine computes too
              "enable_lora": "model.adapters", "max_loras": "model.adapters"}


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
