"""What both sides need to know of a model before loading its weights: its tokenizer and context."""

from __future__ import annotations

from jobs.core.errors import ModelError
from jobs.core.spec import JobSpec, ModelSpec


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


def vllm_refuses(spec: JobSpec) -> str | None:
    """Why the vLLM engine cannot honour this spec's contract, or None."""
    if spec.generation.no_repeat_ngram_size:
        return "vLLM has no no_repeat_ngram_size; use model.engine: transformers, or drop it"
    gpus = spec.resources.num_gpus
    if gpus > 1 and gpus != int(gpus):
        return f"resources.num_gpus {gpus} above 1 means tensor parallelism over whole GPUs; give an integer"
    return None
