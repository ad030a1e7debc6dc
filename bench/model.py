"""The benchmark's model: a Llama-shaped config with random weights, saved with
`save_pretrained` and loaded back with `from_pretrained`, the path real
checkpoints take; plus a byte-level BPE tokenizer trained in seconds on
pseudo-words, so prompts of any token length can be made without downloads."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from examples.demo.bpe_tokenizer import as_transformers, train_bpe

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> dict[str, int]:
        """Parameter counts: input embedding, transformer body, lm_head (untied)."""
        head_dim = self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        body = self.layers * (attn + mlp + norms) + self.hidden
        return {"embedding": self.vocab * self.hidden, "body": body, "lm_head": self.vocab * self.hidden}


# ~26M parameters (embeddings included): small enough for 2 CPU cores.
CPU_SHAPE = ModelShape(vocab=4096, hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1280, max_positions=1024)
# ~1.1B parameters, Llama-3.2-1B-like body (hidden 2048, 16 layers, GQA 32/8, MLP 8192) with a 32k vocabulary.
GPU_SHAPE = ModelShape(vocab=32000, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, max_positions=2048)

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "st", "th", "tr"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    """`n` pronounceable made-up words; their frequency is skewed like real text."""
    vocab = ["".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                     for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))) for _ in range(20_000)]  # fmt: skip
    weights = [1.0 / (i + 10) for i in range(len(vocab))]
    words = rng.choices(vocab, weights=weights, k=n)
    # Some punctuation and capitals, so the byte alphabet is exercised.
    return [w.capitalize() + "." if rng.random() < 0.05 else w for w in words]


def build_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE with `vocab_size` tokens, trained on pseudo-words."""
    rng = random.Random(seed)
    words = pseudo_words(rng, 400_000)
    lines = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    return as_transformers(train_bpe(lines, vocab_size), CHAT_TEMPLATE)


def save_model(path: Path, shape: ModelShape, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> Path:
    """Write a random-weight Llama checkpoint (safetensors) and its tokenizer to `path`.

    The weights are initialised on `device` (a 1B model initialises in seconds on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer(shape.vocab, seed)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_model(path: Path, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) loaded the way bulkgen's replica loads them (TransformersEngine.from_spec)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True)
    return model.to(device).eval(), tokenizer
