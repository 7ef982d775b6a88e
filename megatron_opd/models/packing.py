"""Packed rows: several sequences concatenated into one row ``[1, L]``, each counting its positions
from 0 and attending only to itself (block-causal, and within a sliding window if the model has one),
and which sequences share a row (:func:`pack_lengths`)."""

from __future__ import annotations

import itertools

import torch


def packed_seq_params(lengths: list[int], *, device):
    """megatron's THD description of one packed row of sequences of ``lengths`` tokens (int32
    ``cu_seqlens`` on ``device``, as Transformer Engine requires)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if not lengths or min(lengths) < 1:
        raise ValueError(f"packed sequence lengths must be >= 1, got {lengths}")
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


def block_causal_mask(lengths: list[int], *, sliding_window: int | None = None) -> torch.Tensor:
    """``[1, 1, L, L]`` bool, True where attention is blocked: causal within each packed sequence,
    nothing across sequences (and beyond a sliding window, if any)."""
    total = sum(lengths)
    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    allowed = (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    return ~allowed.view(1, 1, total, total)


def packed_positions(lengths: list[int], *, device) -> torch.Tensor:
    """``[1, L]`` positions of a packed row: every sequence counts from 0."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]).view(1, -1)


def packed_inputs(lengths: list[int], *, device, sliding_window: int | None = None) -> dict:
    """What the model needs besides the token ids to run a packed row: ``position_ids``, and an
    ``attention_mask`` unless the row is one sequence under plain causal attention."""
    inputs = {"position_ids": packed_positions(lengths, device=device)}
    if len(lengths) > 1 or sliding_window is not None:
        inputs["attention_mask"] = block_causal_mask(lengths, sliding_window=sliding_window).to(device)
    return inputs


def pack_lengths(lengths: list[int], *, budget: int) -> list[list[int]]:
    """Group the indices of ``lengths`` into bins of at most ``budget`` tokens (first-fit
    decreasing; a longer sequence gets a bin of its own); indices sorted within a bin."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    sizes: list[int] = []
    for i in order:
        n = lengths[i]
        for b, size in enumerate(sizes):
            if size + n <= budget:
                bins[b].append(i)
                sizes[b] += n
                break
        else:
            bins.append([i])
            sizes.append(n)
    return [sorted(b) for b in bins]
