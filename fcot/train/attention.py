"""Attention over packed micro-batches: each example attends to itself only, with no mask and no padding.

A packed micro-batch is one row of its examples back to back (fcot.train.data.pack_batch), with
`cu_seq_lens_q` (where each example starts, as flash-attention's varlen kernels take it) and position_ids that
restart at 0 per example. transformers calls the function registered here as the model's attention
(`attn_implementation="fcot_packed"`): on CUDA one varlen flash-attention call (torch.nn.attention.varlen),
elsewhere causal SDPA per example, whose cost is that of the example's own length (a block-diagonal mask over
the whole row would cost the row's length squared). Without `cu_seq_lens_q` it is plain SDPA.
"""

from __future__ import annotations

import torch  # this module is model code: only training workers import it
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "fcot_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q=None, max_length_q: int | None = None, **kwargs):
    """query, key, value: (1, heads, tokens, head size); returns (1, tokens, heads, head size), None."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if query.is_cuda and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9, CUDA

        cu = cu_seq_lens_q.to(query.device, torch.int32)
        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
                          int(max_length_q), int(max_length_q), scale=scaling, window_size=(-1, 0),
                          enable_gqa=groups > 1)
        return out.unsqueeze(0), None
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    # split / cat rather than slice assignment: their backward is one cat / split, not a zero-filled row per example
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                      is_causal=True)
                     for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))], 2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_attention)
