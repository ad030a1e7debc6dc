"""Shared prompt prefixes: stable keys and lengths, pure (no torch, no Ray).

Augmentation jobs render thousands of prompts from a few templates or system
prompts. Rows whose prompts start the same way are cheaper together: an
engine computes (or caches) the shared prefix's attention state once. These
helpers name such a prefix; the planner, the schedulers and the engines
decide what to do with the name.

Keys are blake2b digests, never Python's hash(): they must agree across
processes and runs (PYTHONHASHSEED differs per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

MIN_SHARED_PREFIX = 64  # tokens: below this, sharing saves less than it costs to arrange
PREFIX_BLOCK = 64  # tokens per key block: a key names the prompt's first whole blocks
# Characters of rendered text a text key reads (planning runs without a tokenizer): about
# MIN_SHARED_PREFIX tokens of English. A key names where prompts start, so it must be shorter
# than what they share: at 4096, prompts of a 400-token template with their own questions
# after it (shorter than 4096 characters in all) would all have keys of their own.
PREFIX_CHARS = 256


def prefix_key(token_ids: Sequence[int], length: int = MIN_SHARED_PREFIX) -> int | None:
    """A stable 64-bit key of the first `length` tokens, or None for a prompt
    shorter than that (it has no prefix worth sharing)."""
    if len(token_ids) < length:
        return None
    head = ",".join(map(str, token_ids[:length])).encode()
    return int.from_bytes(hashlib.blake2b(head, digest_size=8).digest(), "big")


def text_prefix_key(text: str, chars: int = PREFIX_CHARS) -> int:
    """A stable 64-bit key of a rendered prompt's first `chars` characters."""
    return int.from_bytes(hashlib.blake2b(text[:chars].encode(), digest_size=8).digest(), "big")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_len(prompts: Sequence[Sequence[int]], block: int = PREFIX_BLOCK) -> int:
    """The longest prefix every prompt shares, rounded down to whole blocks, and
    always leaving each prompt at least one token of its own (its last token's
    logits come from a forward the prompt runs itself). 0 for fewer than two
    prompts or a shared part under MIN_SHARED_PREFIX."""
    if len(prompts) < 2:
        return 0
    first = prompts[0]
    shared = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        shared = min(shared, common_prefix_len(first, other))
    shared -= shared % block
    return shared if shared >= MIN_SHARED_PREFIX else 0
