"""The reusable transforms a family table names: TP split/merge, QKV/GQA interleave, gate/up stack.

Two directions, both exact (pure slicing and concatenation, no arithmetic):
- :func:`shard_from_hf` builds one TP rank's megatron tensor, reading only the HF rows/columns
  that rank owns through a :class:`TensorSource`;
- :func:`hf_from_shards` rebuilds the HF tensors from all TP ranks' shards.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_opd.models.config import ArchConfig
from megatron_opd.models.family import COLUMN, GATE_UP, HF_LAYER_PREFIX, QKV, REPLICATED, ROW, VOCAB, Param


class TensorSource(Protocol):
    """Reads HF tensors, or row/column ranges of them, without loading the rest."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


class DictSource:
    """A :class:`TensorSource` over tensors already in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, rows=None, cols=None):
        t = self.tensors[name]
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return t


def _split(n: int, tp_size: int, tp_rank: int, what: str) -> slice:
    if n % tp_size:
        raise ValueError(f"{what}: size {n} is not divisible by tp={tp_size}")
    per = n // tp_size
    return slice(tp_rank * per, (tp_rank + 1) * per)


def hf_shapes(param: Param, arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """The shapes the HF tensors of ``param`` must have for ``arch`` (for validation); keyed by
    the row's names (patterns, for a per-expert row: every expert has these shapes)."""
    h, v = arch.hidden_size, arch.vocab_size
    f = arch.moe_ffn_hidden_size if param.per_expert else arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    is_bias = param.mcore.endswith(".bias")
    names = param.hf
    if param.layout == QKV:
        dims = (q, kv, kv)
        return {n: (d,) if is_bias else (d, h) for n, d in zip(names, dims)}
    if param.layout == GATE_UP:
        return {n: (f, h) for n in names}
    if param.layout == VOCAB:
        return {names[0]: (v, h)}
    if param.mcore.endswith("linear_proj.weight"):
        return {names[0]: (h, q)}
    if param.mcore.endswith("linear_fc2.weight"):
        return {names[0]: (h, f)}
    if param.mcore.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return {names[0]: (arch.head_dim,)}
    if param.mcore.endswith("router.weight"):
        return {names[0]: (arch.num_experts, h)}
    if param.layout == REPLICATED:
        return {names[0]: (h,)}
    raise AssertionError(f"no shape rule for {param}")


def model_hf_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the whole model with its shape (a tied ``lm_head`` is not one)."""
    family = arch.family
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(arch.num_layers):
        prefix = HF_LAYER_PREFIX.format(layer=layer)
        for row in family.layer_params:
            row_shapes = tuple(hf_shapes(row, arch).values())
            for expert in row.experts(arch.num_experts):
                shapes.update(zip((prefix + n for n in row.hf_names(expert=expert)), row_shapes))
    for row in family.global_params:
        if row.mcore == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        shapes.update(hf_shapes(row, arch))
    return shapes


def shard_from_hf(param: Param, names: tuple[str, ...], source: TensorSource, arch: ArchConfig, *,
                  tp_rank: int, tp_size: int, padded_vocab: int) -> torch.Tensor:
    """This TP rank's shard of the megatron tensor ``param``, from HF tensors ``names``."""
    layout = param.layout
    if layout == REPLICATED:
        return source.read(names[0])
    if layout == COLUMN:
        return source.read(names[0], rows=_split(source.shape(names[0])[0], tp_size, tp_rank, names[0]))
    if layout == ROW:
        return source.read(names[0], cols=_split(source.shape(names[0])[1], tp_size, tp_rank, names[0]))
    if layout == VOCAB:
        rows = _split(padded_vocab, tp_size, tp_rank, "padded vocabulary")
        real = slice(min(rows.start, arch.vocab_size), min(rows.stop, arch.vocab_size))
        part = source.read(names[0], rows=real)
        pad = (rows.stop - rows.start) - part.shape[0]
        if pad:
            part = torch.cat([part, part.new_zeros((pad,) + tuple(part.shape[1:]))])
        return part
    if layout == GATE_UP:
        gate, up = names
        rows = _split(source.shape(gate)[0], tp_size, tp_rank, gate)
        return torch.cat([source.read(gate, rows=rows), source.read(up, rows=rows)])
    if layout == QKV:
        # megatron interleaves per query group: [q heads of group g, k of g, v of g] for each g,
        # and TP ranks hold whole groups.
        q_name, k_name, v_name = names
        hd, qpg = arch.head_dim, arch.queries_per_group
        groups = _split(arch.num_kv_heads, tp_size, tp_rank, "num_key_value_heads")
        num_groups = groups.stop - groups.start
        q = source.read(q_name, rows=slice(groups.start * qpg * hd, groups.stop * qpg * hd))
        k = source.read(k_name, rows=slice(groups.start * hd, groups.stop * hd))
        v = source.read(v_name, rows=slice(groups.start * hd, groups.stop * hd))
        tail = tuple(q.shape[1:])
        fused = torch.cat([q.reshape((num_groups, qpg * hd) + tail),
                           k.reshape((num_groups, hd) + tail),
                           v.reshape((num_groups, hd) + tail)], dim=1)
        return fused.reshape((num_groups * (qpg + 2) * hd,) + tail)
    raise AssertionError(layout)


def hf_from_shards(param: Param, names: tuple[str, ...], shards: list[torch.Tensor],
                   arch: ArchConfig) -> dict[str, torch.Tensor]:
    """The HF tensors ``names`` of ``param`` from every TP rank's shard (in TP-rank order)."""
    layout = param.layout
    if layout == REPLICATED:
        return {names[0]: shards[0]}
    if layout == COLUMN:
        return {names[0]: torch.cat(shards, dim=0)}
    if layout == ROW:
        return {names[0]: torch.cat(shards, dim=1)}
    if layout == VOCAB:
        return {names[0]: torch.cat(shards, dim=0)[: arch.vocab_size]}
    if layout == GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {names[0]: torch.cat([g for g, _ in halves]), names[1]: torch.cat([u for _, u in halves])}
    if layout == QKV:
        hd, qpg = arch.head_dim, arch.queries_per_group
        qs, ks, vs = [], [], []
        for s in shards:
            tail = tuple(s.shape[1:])
            grouped = s.reshape((-1, (qpg + 2) * hd) + tail)
            q, k, v = grouped.split([qpg * hd, hd, hd], dim=1)
            qs.append(q.reshape((-1,) + tail))
            ks.append(k.reshape((-1,) + tail))
            vs.append(v.reshape((-1,) + tail))
        return {names[0]: torch.cat(qs), names[1]: torch.cat(ks), names[2]: torch.cat(vs)}
    raise AssertionError(layout)
