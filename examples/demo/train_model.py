"""Train a tiny demo causal LM for bulkgen from the Python standard library's docstrings.

Why: the bulkgen examples need a real Hugging Face model directory (config, safetensors
weights, tokenizer, chat template) that is small enough to keep in the repo and fast
enough to run on CPU, without downloading anything. The docstrings that ship with
every Python install are a free, license-clean, deterministic English corpus, so the
resulting model writes readable "Python documentation"-flavoured text.

Usage:
    python examples/demo/train_model.py                  # ~4 min on 2 idle CPU cores
    python examples/demo/train_model.py --minutes 1 --out /tmp/model   # quick smoke test

Training stops after --max-steps (600) or --minutes (5), whichever comes first. On an
idle 2-core machine the step budget ends it, so the result does not depend on speed.

The result is written to --out (default examples/demo/model/) and loads with:
    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    AutoTokenizer.from_pretrained(out)
"""

import argparse
import importlib
import inspect
import math
import os
import random
import time
import warnings
from pathlib import Path

# Keep CPU use bounded: the tokenizers library (Rust/rayon) and torch would otherwise
# use every core. These must be set before tokenizers/torch start their thread pools.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bpe_tokenizer import SPECIAL, as_transformers, train_bpe  # noqa: E402  (beside this script)
from tokenizers import processors  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).resolve().parent

# Model size. ~2.6M parameters -> ~10 MB of fp32 safetensors, small enough for the repo
# and fast enough to train on two CPU cores in a few minutes.
VOCAB_SIZE = 4096
CONTEXT = 256
HIDDEN = 192
LAYERS = 4
HEADS = 4
INTERMEDIATE = 512

# A fixed, sorted list of standard-library modules: sorted so the corpus (and thus the
# tokenizer and the model) is the same on every run. Modules with side effects on import
# (this, antigravity, turtle, tkinter, idlelib, ...) are deliberately not listed.
STDLIB_MODULES = sorted(
    """
    abc argparse array ast asyncio asyncio.events asyncio.futures asyncio.locks
    asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb binascii
    bisect builtins bz2 calendar cmd codecs collections collections.abc colorsys
    concurrent.futures configparser contextlib copy csv ctypes dataclasses datetime
    decimal difflib dis email email.message email.parser email.utils enum filecmp
    fileinput fnmatch fractions ftplib functools gettext glob gzip hashlib heapq hmac
    html html.parser http http.client http.cookies http.server imaplib importlib
    importlib.util inspect io ipaddress itertools json json.decoder json.encoder keyword
    linecache locale logging logging.handlers lzma mailbox math mimetypes
    multiprocessing multiprocessing.pool numbers operator optparse os os.path pathlib
    pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random re
    reprlib sched secrets selectors shelve shlex shutil signal smtplib socket
    socketserver sqlite3 ssl stat statistics string struct subprocess sysconfig tarfile
    tempfile textwrap threading timeit token tokenize trace traceback types typing
    unittest unittest.case unittest.mock urllib.parse urllib.request uuid warnings wave
    weakref xml.dom.minidom xml.etree.ElementTree xml.sax zipfile zlib zoneinfo
    """.split()
)

# Chat template: plain "role: content" lines, so chat-style prompts from bulkgen render
# to ordinary text the model can continue. add_generation_prompt appends "assistant: ".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# --------------------------------------------------------------------------- corpus
def collect_docstrings() -> list[str]:
    """Docstrings of the listed modules, their public classes/functions and methods.

    inspect.getdoc() dedents the text the same way pydoc/help() shows it. Duplicates
    (e.g. "Initialize self. See help(type(self))...") are kept once so they do not
    dominate the corpus. Iteration is over sorted names, so the order is deterministic.
    """
    seen: set[str] = set()
    docs: list[str] = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= 40 and doc not in seen:  # very short docs carry little text
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # e.g. Python built without sqlite3/ssl/lzma
                print(f"  skipping {name}: {exc}")
                continue
            add(module)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_"):
                    continue
                if inspect.isclass(obj):
                    add(obj)
                    for member_name, member in sorted(vars(obj).items()):
                        if member_name.startswith("_") and member_name != "__init__":
                            continue
                        if (
                            inspect.isfunction(member)
                            or inspect.ismethoddescriptor(member)
                            or isinstance(member, (classmethod, staticmethod, property))
                        ):
                            add(member)
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(obj)
    return docs


# ------------------------------------------------------------------------ tokenizer
def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, bpe_tokenizer.py): any input string is encodable, no unknown bytes."""
    tok = train_bpe(docs, VOCAB_SIZE, min_frequency=2)
    # Prepend <|endoftext|> to every encoded text: during training each docstring
    # follows a separator, so prompts then look like "the start of a docstring".
    eot = tok.token_to_id(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A",
        pair=f"{SPECIAL} $A {SPECIAL} $B",
        special_tokens=[(SPECIAL, eot)],
    )
    return as_transformers(
        tok,
        CHAT_TEMPLATE,
        unk_token=SPECIAL,
        model_max_length=CONTEXT,
        clean_up_tokenization_spaces=False,  # byte-level: decode must round-trip exactly
    )


# ---------------------------------------------------------------------------- model
def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    eot = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,  # input/output embeddings shared: halves the largest matrix
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    model = LlamaForCausalLM(config)
    # Defaults used by model.generate(); bulkgen can override them per request.
    model.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_new_tokens=64,
    )
    return model


# ------------------------------------------------------------------------- training
def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to floor*peak.

    `progress` is the fraction of the budget used (see train()), in [0, 1].
    """
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


def train(model, ids: torch.Tensor, args) -> float:
    # Hold out the last 5% of the token stream to report a validation loss: it shows
    # whether the model generalises or just memorised the (small) corpus.
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    gen = torch.Generator().manual_seed(args.seed)

    def batch(source: torch.Tensor, size: int) -> torch.Tensor:
        # Random windows from the packed stream; windows may cross docstring boundaries,
        # which is how the model learns that <|endoftext|> ends a document.
        starts = torch.randint(0, len(source) - args.seq_len - 1, (size,), generator=gen)
        return torch.stack([source[s : s + args.seq_len] for s in starts.tolist()])

    # Standard small-LM recipe: AdamW, no weight decay on norms, gradient clipping.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    # Two budgets, whichever runs out first: --max-steps makes the run reproducible on
    # a machine fast enough to reach it; --minutes bounds the wall time on a slow or busy
    # one. The learning-rate schedule follows the larger of the two fractions, so it
    # always decays fully by the end whichever budget ends the run.
    budget = args.minutes * 60.0
    model.train()
    start = time.time()
    step, ema = 0, None
    while (progress := max(step / args.max_steps, (time.time() - start) / budget)) < 1.0:
        elapsed = time.time() - start
        lr = lr_at(progress, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x = batch(train_ids, args.batch_size)
        loss = model(input_ids=x, labels=x).loss  # labels are shifted inside the model
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0:
            print(f"step {step:5d}  {elapsed:6.1f}s  lr {lr:.2e}  loss {loss.item():.3f}  (avg {ema:.3f})")

    model.eval()
    with torch.no_grad():
        val = batch(val_ids, 32)
        val_loss = model(input_ids=val, labels=val).loss.item()
    print(f"done: {step} steps in {time.time() - start:.0f}s, "
          f"train loss (avg) {ema:.3f}, validation loss {val_loss:.3f}")
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "model"), help="output model directory")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (cap)")
    parser.add_argument("--max-steps", type=int, default=600,
                        help="step budget (training stops at whichever budget ends first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128,
                        help="training window (shorter than CONTEXT: more steps per minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    print("collecting standard-library docstrings ...")
    docs = collect_docstrings()
    print(f"  {len(docs)} docstrings, {sum(map(len, docs)) / 1e6:.2f} MB of text")

    print(f"training byte-level BPE tokenizer (vocab {VOCAB_SIZE}) ...")
    tokenizer = train_tokenizer(docs)

    # One long token stream: <|endoftext|> doc <|endoftext|> doc ... (the post-processor
    # already prepends the separator to every document).
    ids = torch.tensor([t for ids in tokenizer(docs, verbose=False)["input_ids"] for t in ids], dtype=torch.long)
    print(f"  {len(ids)} tokens ({len(ids) / sum(map(len, docs)):.2f} tokens per char)")

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; "
          f"training for {args.max_steps} steps or {args.minutes:g} min ...")
    train(model, ids, args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({size / 1e6:.1f} MB); total time {time.time() - t0:.0f}s")

    # A quick look at what the model writes: greedy (deterministic) and sampled.
    prompts = ["Return the", "This module provides", "Create a new socket"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        greedy = model.generate(**enc, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
        sampled = model.generate(**enc, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50)
    width = enc["input_ids"].shape[1]
    for name, outs in (("greedy", greedy), ("sampled", sampled)):
        for prompt, row in zip(prompts, outs):
            text = tokenizer.decode(row[width:], skip_special_tokens=True)
            print(f"[{name}] {prompt}{text!r}")


if __name__ == "__main__":
    main()
