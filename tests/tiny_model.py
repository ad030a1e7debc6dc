"""Tiny real checkpoints for tests: a config, random weights and a byte-level
BPE tokenizer trained in well under a second. They load through the same
`from_pretrained` calls that real checkpoints take."""

from __future__ import annotations

from pathlib import Path

from examples.demo.bpe_tokenizer import as_transformers, train_bpe

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_CORPUS = [
    "Return the number of items in the list.",
    "Write a short poem about the sea and the wind.",
    "The quick brown fox jumps over the lazy dog.",
    "Create a new socket using the given address family.",
    "Raise ValueError if the timeout is negative.",
] * 20


def build_tokenizer(vocab_size: int = 300):
    return as_transformers(train_bpe(_CORPUS, vocab_size), CHAT_TEMPLATE, model_max_length=128)


def save_tiny_model(path: Path, arch: str = "llama", max_positions: int = 128, seed: int = 0, hidden: int = 64) -> Path:
    """Write a tiny random-weight checkpoint (safetensors) plus tokenizer to `path`
    (`hidden`: the Llama's hidden size, for a checkpoint another's adapters do not fit)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden,  # 64: head_dim 32, the smallest vLLM's CPU attention kernels take
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# A template that opens the thinking in the prompt, as DeepSeek-R1's does: the model writes
# its thinking, then </think>, then the answer.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace("assistant:{% endif %}", "assistant: <think>{% endif %}")

# What save_thinking_model's checkpoint answers to each prompt, greedily (its whole training set).
THINKING_ANSWERS = {
    "Write a short poem about the sea and the wind.": ("the sea and the wind", "A short poem."),
    "Return the number of items in the list.": ("count the items", "Use len."),
}


def save_thinking_model(path: Path) -> Path:
    """A tiny Llama that thinks: trained (seconds, on CPU) to answer each THINKING_ANSWERS prompt, as a
    user message rendered by THINKING_TEMPLATE, with "<thinking></think><answer>" and its EOS. The tags
    are added (not special) tokens, so they are single tokens and stay in the decoded text."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    eos = tokenizer.eos_token_id
    sequences = []
    for prompt, (thinking, answer) in THINKING_ANSWERS.items():
        chat = [{"role": "user", "content": prompt}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        # The prompt's ids as the job renders them (a chat prompt has no special tokens added), then the completion's.
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        ids += tokenizer(f"{thinking}</think>{answer}", add_special_tokens=False).input_ids + [eos]
        sequences.append(torch.tensor(ids))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):  # at 60 an answer still runs on past its EOS
        loss = sum(model(input_ids=ids[None], labels=ids[None]).loss for ids in sequences)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def train_lora(base: Path, out: Path, text: str, seed: int, steps: int = 20, target_modules=("q_proj", "v_proj")) -> Path:
    """Train a LoRA adapter on `base` to continue `text` (a few steps: its greedy text changes)
    and save it with PEFT's save_pretrained (adapter_config.json, adapter_model.safetensors) to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(target_modules), lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    ids = torch.tensor([AutoTokenizer.from_pretrained(base)(text).input_ids])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.save_pretrained(out)
    return out


def save_without_weight(model: Path, path: Path, name: str) -> Path:
    """A copy of checkpoint `model` at `path` whose safetensors lack the parameter `name`
    (config and tokenizer intact): it loads only with that weight made up."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    del tensors[name]
    save_file(tensors, weights, metadata={"format": "pt"})
    return path
