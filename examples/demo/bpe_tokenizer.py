"""The byte-level BPE tokenizer (GPT-2 style) of every model made here without a
download: the demo model (train_model.py, beside this file), the tests' tiny
models (tests/tiny_model.py) and the benchmark's (bench/model.py). Any string
encodes, with no unknown bytes; training takes seconds.

A file of its own, importing nothing at module level, so tests and the benchmark
import it (as examples.demo.bpe_tokenizer) without the demo script's torch and
thread settings; the script imports it as its neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL = "<|endoftext|>"  # the one special token (id 0): document separator, bos, eos and pad


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 0):
    """A `tokenizers.Tokenizer` of `vocab_size` tokens trained on `texts`, in their order (the
    same texts give the same merges): every byte, SPECIAL, then the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL],  # gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def as_transformers(tok, chat_template: str, **options):
    """`tok` as transformers loads it (PreTrainedTokenizerFast): SPECIAL as bos, eos and pad
    (the attention mask hides pads), padded on the left as a decoder-only model's batches
    must be, with `chat_template`; `options`: more of PreTrainedTokenizerFast's arguments."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL,
        eos_token=SPECIAL,
        pad_token=SPECIAL,
        padding_side="left",
        chat_template=chat_template,
        **options,
    )
