"""Variable-length causal attention in plain torch: each sequence of a packed (THD) row attends
only to itself (and within a sliding window, if any), one ``scaled_dot_product_attention`` call per
sequence, so memory is that of the longest sequence, never O(t^2) in the row. Importable without
megatron-core (the GPU check runs it where megatron-core is absent); megatron's core-attention
slot around it is :class:`megatron_opd.models.attention.VarlenAttention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(length: int, window: int, device) -> torch.Tensor:
    """``[length, length]`` bool, True where query i may see key j: i - window < j <= i."""
    pos = torch.arange(length, device=device)
    diff = pos[:, None] - pos[None, :]
    return (diff >= 0) & (diff < window)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None,
         mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal (windowed) attention of ``[b, heads, s, d]`` queries over ``[b, groups, s, d]``
    keys/values; ``mask`` (True = may attend) replaces the causal rule when given."""
    s = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and window is not None and s > window:
        mask = window_mask(s, window, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def varlen_attention(query_thd: torch.Tensor, key_thd: torch.Tensor, value_thd: torch.Tensor,
                     cu_seqlens: list[int], *, scale: float, window: int | None = None,
                     cu_seqlens_padded: list[int] | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention within each packed sequence: ``[t, heads, d]`` queries over
    ``[t, groups, d]`` keys/values, sequence i being rows ``cu_seqlens[i]:cu_seqlens[i+1]``
    (or, with ``cu_seqlens_padded``, the first ``cu_seqlens[i+1] - cu_seqlens[i]`` rows of
    ``cu_seqlens_padded[i]:cu_seqlens_padded[i+1]``; padding rows give zeros). Returns
    ``[t, heads, d]``."""
    bounds = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    lengths = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    # One split per tensor: its backward is one concatenation (per-sequence slicing would
    # allocate a full-size gradient per sequence).
    pieces = []
    for q, k, v, length, size in zip(query_thd.split(sizes), key_thd.split(sizes),
                                     value_thd.split(sizes), lengths, sizes):
        if length:
            # [s, heads, d] -> [1, heads, s, d] and back
            q, k, v = (x[:length].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            pieces.append(sdpa(q, k, v, scale=scale, window=window, dropout_p=dropout_p)[0].transpose(0, 1))
        if size > length:
            pieces.append(query_thd.new_zeros(size - length, query_thd.shape[1], value_thd.shape[2]))
    return torch.cat(pieces)
