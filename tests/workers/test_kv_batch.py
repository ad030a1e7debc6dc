"""SlabLayer: the keys and values of a DynamicLayer, written in place."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from workers.kv_batch import SLAB_SPARE, SlabLayer


def steps(layer, count: int, batch: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for width in [5] + [1] * (count - 1):  # a prefill, then one token per step
        k, v = torch.randn(batch, 2, width, 4, generator=g), torch.randn(batch, 2, width, 4, generator=g)
        out.append(layer.update(k, v))
    return out


def test_a_slab_holds_what_a_dynamic_layer_holds_step_by_step():
    slab, plain = SlabLayer(), DynamicLayer()
    for (ks, vs), (kp, vp) in zip(steps(slab, 80), steps(plain, 80)):
        assert torch.equal(ks, kp) and torch.equal(vs, vp)
    assert slab.get_seq_length() == plain.get_seq_length() == 84


def test_a_decode_step_writes_in_place_until_the_slab_is_full():
    layer = SlabLayer()
    steps(layer, 1)  # the prefill: 5 columns, SLAB_SPARE to spare
    storage = layer.keys.untyped_storage().data_ptr()
    steps(layer, SLAB_SPARE + 1, seed=1)
    assert layer.get_seq_length() == 5 + 5 + SLAB_SPARE
    assert layer.keys.untyped_storage().data_ptr() != storage  # grew once it was full
    grown = layer.keys.untyped_storage().data_ptr()
    layer.update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    assert layer.keys.untyped_storage().data_ptr() == grown  # and writes in place again


def test_row_selection_padding_and_trimming_match_a_dynamic_layer():
    slab, plain = SlabLayer(), DynamicLayer()
    steps(slab, 10), steps(plain, 10)
    index = torch.tensor([2, 0])
    slab.batch_select_indices(index), plain.batch_select_indices(index)
    slab.drop_leading(3)
    plain.keys, plain.values = plain.keys[:, :, 3:], plain.values[:, :, 3:]
    assert torch.equal(slab.keys, plain.keys) and torch.equal(slab.values, plain.values)
    padded = torch.nn.functional.pad(slab.keys, (0, 0, 2, 0))  # merge left-pads by assigning
    slab.keys = padded
    assert torch.equal(slab.keys, padded) and slab.values.shape[-2] == padded.shape[-2] - 2
    slab.values = torch.nn.functional.pad(slab.values, (0, 0, 2, 0))
    k, v = torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4)
    keys, values = slab.update(k, v)
    assert keys.shape[-2] == values.shape[-2] == padded.shape[-2] + 1 and torch.equal(keys[:, :, -1:], k)
