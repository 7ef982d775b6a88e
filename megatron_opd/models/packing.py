"""Packed rows: several sequences concatenated into one row ``[1, L]`` and described to megatron in
THD format (``PackedSeqParams`` with cumulative sequence lengths), each counting its positions from
0 and attending only to itself; padding that brings a row to the token multiple megatron needs; and
which sequences share a row (:func:`pack_lengths`)."""

from __future__ import annotations

import itertools
import math

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


def packed_positions(lengths: list[int], *, device) -> torch.Tensor:
    """``[1, L]`` positions of a packed row: every sequence counts from 0."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]).view(1, -1)


def token_multiple(config) -> int:
    """What the token count of a packed row must be a multiple of for megatron's ``config``: the
    TP size under sequence parallelism (the row is scattered along the sequence over the TP
    ranks), twice the context-parallel size under context parallelism; else 1."""
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if config.context_parallel_size > 1:
        multiple = math.lcm(multiple, 2 * config.context_parallel_size)
    return multiple


def row_padding(tokens: int, multiple_of: int) -> int:
    """How many padding tokens bring a packed row of ``tokens`` tokens to a multiple of
    ``multiple_of``."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    return -tokens % multiple_of


def packed_inputs(lengths: list[int], *, device, padding: int = 0) -> dict:
    """What the model needs besides the token ids to run a packed (THD) row of sequences of
    ``lengths`` tokens followed by ``padding`` padding tokens: ``position_ids`` (from 0 in every
    sequence) and megatron's ``packed_seq_params``. The padding is a sequence of its own: it
    attends only to itself, so no real token sees it, and carries no loss."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    segments = [*lengths, padding] if padding else list(lengths)
    return {"position_ids": packed_positions(segments, device=device),
            "packed_seq_params": packed_seq_params(segments, device=device)}


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
