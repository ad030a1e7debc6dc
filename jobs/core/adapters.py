"""PEFT LoRA adapters (model.adapter, model.adapters): their names, their files, their identity
and what they say of themselves, read without loading a tensor.

An adapter is a directory PEFT's `save_pretrained` wrote: adapter_config.json and
adapter_model.safetensors (or a pickled adapter_model.bin). Its identity is a SHA-256 over
those files, filled into the spec when it is loaded (jobs/core/spec.py), so the fingerprint,
the job record, the Parquet metadata and the row cache's keys all change when it does.
The driver's checks (jobs/preflight.py) and vLLM's (jobs/core/vllm_support.py) read the rest
here. Imports neither torch nor PEFT.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch, so no adapter may take it
DEFAULT = "default"  # model.adapter's name, in the adapter column
_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # no '.': PEFT names torch modules after it
# What vLLM 0.32 takes as max_lora_rank (vllm/config/lora.py MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights strings that leave a plain LoRA once saved (vllm/lora/peft_helper.py _init_is_supported).
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_PREFIX = "base_model.model."  # of every key PEFT saves
# lora_A [r, in] and lora_B [out, r] of a Linear; lora_embedding_A [r, num_embeddings] and
# lora_embedding_B [embedding_dim, r] of an Embedding: inputs last in A, outputs first in B.
_KEY = re.compile(r"(?P<module>.+)\.lora_(?:embedding_)?(?P<half>[AB])(?:\.weight)?")


def is_name(name: str) -> bool:
    """Whether `name` may name an adapter (in the spec, an adapter column, a batch line's model)."""
    return bool(_NAME.fullmatch(name)) and name != BASE


def weight_file(path: str | Path) -> Path | None:
    """The adapter's weights: safetensors when it has them, else the pickle; None when neither."""
    for name in (SAFETENSORS, PICKLE):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def files_sha256(path: str | Path) -> str:
    """SHA-256 over `name\\0bytes` of the adapter's config and weight files, in name order."""
    digest = hashlib.sha256()
    for name in sorted((CONFIG, SAFETENSORS, PICKLE)):
        p = Path(path) / name
        if p.is_file():
            digest.update(name.encode() + b"\0")
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def read_config(path: str | Path) -> dict:
    """adapter_config.json as a dict; FileNotFoundError without one, ValueError if it is no JSON object."""
    doc = json.loads((Path(path) / CONFIG).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{CONFIG} holds {type(doc).__name__}, not an object")
    return doc


def rank(config: dict) -> int:
    """The largest LoRA rank of any module (r, or a rank_pattern's)."""
    return max([int(config.get("r") or 0), *(config.get("rank_pattern") or {}).values()])


def vllm_max_lora_rank(ranks) -> int:
    """vLLM's max_lora_rank for adapters of these ranks: the smallest it takes that holds them all."""
    return next(r for r in VLLM_RANKS if r >= max(ranks))


def vllm_refusal(config: dict) -> str | None:
    """What of this LoRA vLLM 0.32 does not load (vllm/lora/peft_helper.py validate_legal), or None.
    DoRA, which vLLM refuses too, is left out: PEFT's mixed-adapter batches do not run it either,
    so jobs/preflight.check_adapters refuses it for both engines."""
    modules = [m for m in config.get("modules_to_save") or () if m not in ("classifier", "score")]
    init = config.get("init_lora_weights", True)
    features = {
        f"modules_to_save {modules}": bool(modules),
        "a LoRA bias (lora_bias)": bool(config.get("lora_bias")),
        f"bias {config.get('bias')!r}": config.get("bias", "none") != "none",
        f"init_lora_weights {init!r}": isinstance(init, str) and init.lower() not in _VLLM_INITS,
        "Activated LoRA (alora_invocation_tokens)": bool(config.get("alora_invocation_tokens")),
        "layer_replication": bool(config.get("layer_replication")),
        "block-diagonal LoRA (use_bdlora)": bool(config.get("use_bdlora")),
        "QALoRA (use_qalora)": bool(config.get("use_qalora")),
        f"rank {rank(config)}, above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}": rank(config) > VLLM_RANKS[-1],
    }
    used = [feature for feature, present in features.items() if present]
    return f"uses {', '.join(used)}" if used else None


def lora_shapes(weights: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """The adapted modules (names as in the base model) and their LoRA factors' shapes,
    {module: {"A": shape, "B": shape}}, read from a safetensors file's header (no tensor is loaded)."""
    from safetensors import safe_open

    modules: dict[str, dict] = {}
    with safe_open(str(weights), framework="numpy") as st:
        for key in st.keys():
            match = _KEY.fullmatch(key.removeprefix(_PREFIX))
            if match is None:
                continue  # modules_to_save copies, trainable tokens: whole tensors, not factors
            modules.setdefault(match["module"], {})[match["half"]] = tuple(st.get_slice(key).get_shape())
    return modules


def misfit(shapes: dict[str, dict], modules: dict[str, tuple[int, int] | None]) -> str | None:
    """Why LoRA factors of these shapes (lora_shapes) cannot apply to a base model whose modules
    are `modules` ({name: (inputs, outputs)}, None for a module of another kind), or None."""
    for name, factors in sorted(shapes.items()):
        if name not in modules:
            return f"adapts {name}, which the base model does not have (trained on another base model?)"
        if modules[name] is None or "A" not in factors or "B" not in factors:
            continue  # PEFT itself names what it cannot load
        inputs, outputs = modules[name]
        if factors["A"][-1] != inputs:
            return f"{name} takes {inputs} inputs, the adapter's lora_A expects {factors['A'][-1]}"
        if factors["B"][0] != outputs:
            return f"{name} gives {outputs} outputs, the adapter's lora_B gives {factors['B'][0]}"
    return None
