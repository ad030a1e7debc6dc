"""The running batch of the transformers engine and the cache surgery that continuous batching needs.

The KV cache is left-padded: (B, heads, L, head_dim) per layer, with a (B, L)
mask that is 1 where a real token sits. Rows join by left-padding the
narrower of two caches and stacking; rows leave by selecting indices; the
leading columns that no remaining row uses are trimmed away. A chunk whose rows
shared a prompt prefix holds that prefix in its leading columns and the padding
after it; nothing here assumes the padding leads (the mask is read per column).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from workers.engine import Request, TopLogprobs


@dataclass
class Row:
    """A sequence while it decodes. Restarting it from scratch reproduces it
    exactly (its generator is re-seeded), which is what makes eviction safe."""

    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated so far
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    finish_reason: str | None = None
    matcher: object | None = None  # the request's grammar state (an llguidance matcher), when it is constrained
    token_logprobs: list[float] = field(default_factory=list)  # per generated token, when the request asked
    top_logprobs: list[TopLogprobs] = field(default_factory=list)

    @property
    def final_width(self) -> int:
        """Tokens this row may hold in the cache when it ends."""
        return len(self.request.prompt_ids) + self.request.max_new_tokens


@dataclass
class Batch:
    """The running batch: rows, their KV cache and what the next forward needs."""

    rows: list[Row]
    cache: object  # transformers DynamicCache, (B, heads, L, head_dim) per layer
    mask: torch.Tensor  # (B, L) 1 where the cache holds a real token; left padding is 0
    next_pos: torch.Tensor  # (B,) position of each row's next token
    next_input: torch.Tensor  # (B,) each row's newest token, not yet in the cache
    seen: torch.Tensor | None  # (B, V) tokens each row has seen, for the repetition penalty

    def keep(self, keep: list[int], trim: bool) -> None:
        """Keep only the rows at `keep` (finished rows leave: no more compute on them)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)  # a slab keeps its spare columns
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_pos, self.next_input = self.mask[index], self.next_pos[index], self.next_input[index]
        self.seen = self.seen[index] if self.seen is not None else None
        if trim:
            _trim_left_padding(self)


def merge(a: Batch, b: Batch) -> Batch:
    """One batch from two: left-pad the narrower cache and mask, stack the rows."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for x in (a, b):
        pad = width - x.mask.shape[1]
        if pad:
            x.mask = torch.nn.functional.pad(x.mask, (pad, 0))
            for layer in x.cache.layers:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([la.keys, lb.keys])
        la.values = torch.cat([la.values, lb.values])
    seen = torch.cat([a.seen, b.seen]) if a.seen is not None else None
    return Batch(
        a.rows + b.rows,
        a.cache,
        torch.cat([a.mask, b.mask]),
        torch.cat([a.next_pos, b.next_pos]),
        torch.cat([a.next_input, b.next_input]),
        seen,
    )


def _trim_left_padding(b: Batch) -> None:
    """Drop leading cache columns that no remaining row uses (their long neighbours left)."""
    used = b.mask.any(dim=0)
    first = int(used.float().argmax())
    if first > 0:
        b.mask = b.mask[:, first:]
        for layer in b.cache.layers:
            if isinstance(layer, SlabLayer):
                layer.drop_leading(first)  # a view: no copy, and the spare columns stay
            else:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]


def spliceable(cache) -> bool:
    # Rows can be spliced in and padding trimmed only where every layer is a
    # plain growing cache; sliding-window and linear-attention layers keep
    # state we do not rewrite, so those models decode batch by batch instead.
    return all(type(layer) in (DynamicLayer, SlabLayer) for layer in cache.layers)


def slab_cache(cache) -> None:
    """Make every layer of a fresh, spliceable DynamicCache a SlabLayer (before its first forward)."""
    cache.layers = [SlabLayer() for _ in cache.layers]


SLAB_SPARE = 64  # columns a slab grows by: one copy of the cache per 64 decode steps, not one per step


class SlabLayer(DynamicLayer):
    """A DynamicLayer whose keys and values sit at the front of larger buffers (slabs), so a
    step writes its token in place. DynamicLayer concatenates the whole cache on every step, a
    copy of (B, heads, L, head_dim) per layer per token; a slab is copied only when it is full,
    and then grows by SLAB_SPARE columns. `keys` and `values` read as views of the used columns;
    assigning either (merge, padding) adopts the new tensor as its slab."""

    def __init__(self, **kwargs):
        self._slabs: list = [None, None]  # keys, values: (B, heads, capacity, head_dim)
        self._used = [0, 0]  # columns of each slab in use
        super().__init__(**kwargs)

    @property
    def keys(self):
        return self._view(0)

    @keys.setter
    def keys(self, tensor):
        self._adopt(0, tensor)

    @property
    def values(self):
        return self._view(1)

    @values.setter
    def values(self, tensor):
        self._adopt(1, tensor)

    def _view(self, which: int):
        slab = self._slabs[which]
        return slab if slab is None or slab.dim() != 4 else slab[:, :, : self._used[which]]

    def _adopt(self, which: int, tensor) -> None:
        self._slabs[which] = tensor
        self._used[which] = tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for which, new in enumerate((key_states, value_states)):
            slab, used = self._slabs[which], self._used[which]
            end = used + new.shape[-2]
            if slab.dim() != 4 or end > slab.shape[-2]:
                grown = new.new_empty((*new.shape[:2], end + SLAB_SPARE, new.shape[-1]))
                if used:
                    grown[:, :, :used] = slab[:, :, :used]
                slab = self._slabs[which] = grown
            slab[:, :, used:end] = new
            self._used[which] = end
        return self.keys, self.values

    def batch_select_indices(self, indices) -> None:
        """Keep the rows at `indices`, and the slabs' spare columns with them."""
        if self.get_seq_length() > 0:
            self._slabs = [slab[indices, ...] for slab in self._slabs]

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` positions of every row (padding no row uses): a view, no copy."""
        self._slabs = [slab[:, :, columns:] for slab in self._slabs]
        self._used = [used - columns for used in self._used]
