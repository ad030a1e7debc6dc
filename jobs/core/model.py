"""What both sides need to know of a model before loading its weights: its tokenizer, its
config's text part (context length, dtype, shapes)."""

from __future__ import annotations

import functools

from jobs.core.errors import ModelError
from jobs.core.spec import ModelSpec


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            spec.tokenizer or spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from {spec.tokenizer or spec.path!r}: {e}") from e


def missing_weights(path: str, missing) -> ModelError:
    """The error for a checkpoint whose weights lack parameters its architecture needs (the driver's
    meta-model check and the replica's load both find it, and say it the same way)."""
    missing = sorted(missing)
    return ModelError(
        f"model weights in {path} lack {len(missing)} parameters the architecture needs, e.g. {missing[:3]}"
    )


def context_length(config) -> int | None:
    """Most tokens (prompt + new) the model attends over, from its config; None if it does not say."""
    text_config = config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


def text_config(spec: ModelSpec):
    """The checkpoint's config (its text model's, for a multimodal one), read once per process."""
    return _load_text_config(spec.path, spec.revision, spec.trust_remote_code)


@functools.lru_cache(maxsize=8)  # auto, the dtype and the KV size all ask; one read serves them
def _load_text_config(path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code).get_text_config()


def checkpoint_dtype(spec: ModelSpec) -> str:
    """The dtype the checkpoint's config names ("float32", ...), or "auto" when it names none."""
    dtype = getattr(text_config(spec), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"
