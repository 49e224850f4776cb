"""Attention over packed micro-batches: each example attends to itself only, with no mask and no padding.

A packed micro-batch is one row of its examples back to back (fcot.train.data.pack_batch), with
`cu_seq_lens_q` (where each example starts, as flash-attention's varlen kernels take it) and position_ids that
restart at 0 per example. transformers calls the function registered here as the model's attention
(`attn_implementation="fcot_packed"`): on CUDA in bf16/fp16 one varlen flash-attention call
(torch.nn.attention.varlen, torch >= 2.9), elsewhere (CPU, fp32, an older torch) causal SDPA per example, whose
cost is that of the example's own length (a block-diagonal mask over the whole row would cost the row's length
squared). A sliding window (Mistral, Qwen) is honoured by both; a soft cap on the scores (Gemma-2) is refused by
name. Without `cu_seq_lens_q` it is plain SDPA.
"""

from __future__ import annotations

import inspect

import torch  # this module is model code: only training workers import it
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from fcot.errors import FcotError

NAME = "fcot_packed"


def _varlen():
    """torch's varlen flash attention, how it is told to be causal, and the keyword names it takes; None where this
    torch has none (it came in 2.9 with `is_causal` and without `scale` or `enable_gqa`; `window_size` replaced
    `is_causal` in 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9 only
    except ImportError:
        return None
    params = set(inspect.signature(varlen_attn).parameters)
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}, params
    return (varlen_attn, {"is_causal": True}, params) if "is_causal" in params else None


VARLEN = _varlen()


def varlen_call(varlen, query, key, value, cu_seq_lens, max_length: int, scaling: float | None, groups: int,
                window: int | None):
    """One varlen flash-attention call over a packed row ((1, heads, tokens, head size) in, (1, tokens, heads, head
    size) out), on whichever signature this torch has (VARLEN); None where it cannot honour the window. Where the
    kernel takes no `scale`, the queries carry it; no `enable_gqa`, the key/value heads are repeated."""
    fn, causal, params = varlen
    if window and "window_size" not in causal:
        return None
    if window:
        causal = {"window_size": (window - 1, 0)}
    kwargs = dict(causal)
    if scaling is not None:
        if "scale" in params:
            kwargs["scale"] = scaling
        else:  # the kernel's own scale is 1/sqrt(head size)
            query = query * (scaling * query.shape[-1] ** 0.5)
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    cu = cu_seq_lens.to(query.device, torch.int32)
    out = fn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu, int(max_length),
             int(max_length), **kwargs)
    return out.unsqueeze(0)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q=None, max_length_q: int | None = None, **kwargs):
    """query, key, value: (1, heads, tokens, head size); returns (1, tokens, heads, head size), None."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap"):  # Gemma-2 style: neither kernel here applies a soft cap to the scores
        raise FcotError(f"packing: {type(module).__name__} caps its attention scores (softcap), which packed attention "
                        "does not do: set train.packing: false for this student")
    window = kwargs.get("sliding_window")  # Mistral / Qwen style: each token sees the last `window` tokens
    groups = getattr(module, "num_key_value_groups", 1)
    # Flash attention takes 16-bit tensors only: fp32 on CUDA (precision fp32) runs the SDPA path below.
    if VARLEN is not None and query.is_cuda and dropout == 0.0 and query.dtype in (torch.float16, torch.bfloat16):
        out = varlen_call(VARLEN, query, key, value, cu_seq_lens_q, max_length_q, scaling, groups, window)
        if out is not None:
            return out, None
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]

    def one(q, k, v):
        n = q.shape[2]
        if not window or window >= n:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                    is_causal=True)
        i = torch.arange(n, device=q.device)
        band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # causal, within the window
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout,
                                                                scale=scaling)

    # split / cat rather than slice assignment: their backward is one cat / split, not a zero-filled row per example
    out = torch.cat([one(q, k, v) for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                                                     value.split(lengths, 2))], 2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_attention)
