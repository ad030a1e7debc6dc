"""Grouped-query attention on CPU without copying the KV cache every step.

transformers' `sdpa` attention repeats each key/value head once per query head
it serves (`repeat_kv`: a copy of the whole cache, per layer, per step)
whenever an attention mask is passed, and the transformers engine always
passes one (its batch is left-padded). torch's CPU kernel takes the grouped
heads as they are (`enable_gqa`) and returns the same bits, so the engine
switches its model to this function: on the bench model the copy was a third
of a decode step (docs/design/transformers-engine-profile.md).
"""

from __future__ import annotations

import torch

NAME = "bulkgen_sdpa_gqa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, minus the key/value copy when heads are grouped and a mask is given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = attention_mask is None or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
    if not grouped or plain or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # What sdpa_attention_forward runs with a mask (is_causal is then False), with the heads grouped.
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> bool:
    """Run `model` (on CPU, with sdpa attention) through `_sdpa_gqa`; whether it was switched.
    Other devices keep theirs: CUDA's kernels fall back to plain math for a masked grouped call."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, _sdpa_gqa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as sdpa
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
