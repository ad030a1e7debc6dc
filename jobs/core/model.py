"""What both sides need to know of a model before loading its weights: its tokenizer and context."""

from __future__ import annotations

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


def context_length(config) -> int | None:
    """Most tokens (prompt + new) the model attends over, from its config; None if it does not say."""
    text_config = config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
