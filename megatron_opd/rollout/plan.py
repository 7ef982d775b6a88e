"""The resharding planner: which pipeline stage and TP ranks hold each HF tensor's slices, how the
slices are regrouped, and which bucket moves them. Pure: no processes, no tensors.

Mixture-of-experts layers: every expert-parallel rank holds ``num_experts / ep`` experts, each
split over the expert tensor-parallel group. One plan item is one local expert's parameter; it
stands for that parameter of every EP rank's expert at the same local index (``ep`` copies, HF
names of experts ``r * num_local + j``), and moves in expert buckets: gathered over expert TP,
regrouped, then gathered over EP, so that every rank hands its engine every expert."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_opd.models.config import ArchConfig
from megatron_opd.models.family import (HF_LAYER_PREFIX, MCORE_LAYER_PREFIX, QKV, GATE_UP, REPLICATED, ROW,
                                        VOCAB, Param)
from megatron_opd.models.layout import hf_shapes


@dataclass(frozen=True)
class PlanItem:
    """One megatron parameter on one pipeline stage and the HF tensors it becomes.

    Every TP rank of ``stage`` holds a ``shard_shape`` slice (split along ``shard_dim``; rank r
    holds the r-th slice); ``layout`` says how the gathered slices regroup into ``hf_names``
    (QKV interleaved per query group, gate/up stacked per rank, vocabulary padding stripped).
    ``aliases`` receive a copy of ``hf_names[0]`` (the tied ``lm_head``). An expert item holds
    ``ep_copies`` groups of names, one per expert-parallel rank (in EP-rank order), each group
    the HF tensors of that rank's expert; its shards are split over expert TP.
    """

    stage: int
    mcore_name: str
    layout: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    shard_shape: tuple[int, ...]
    shard_dim: int | None  # None: replicated, no TP gather
    aliases: tuple[str, ...] = ()
    ep_copies: int = 0  # 0: not an expert parameter

    @property
    def is_expert(self) -> bool:
        return self.ep_copies > 0

    def copy_names(self, copy: int = 0) -> tuple[str, ...]:
        """The HF names of one EP rank's expert (or of the whole item when it is not an expert)."""
        k = len(self.hf_names) // max(self.ep_copies, 1)
        return self.hf_names[copy * k:(copy + 1) * k]

    def copy_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.hf_shapes[:len(self.copy_names())]

    def row_for(self, copy: int = 0) -> Param:
        return Param(self.mcore_name, self.copy_names(copy), self.layout)

    @property
    def row(self) -> Param:
        return self.row_for(0)

    def copy_numel(self) -> int:
        """Elements of one copy's HF tensors (what one EP rank regroups)."""
        return sum(math.prod(s) for s in self.copy_shapes())

    def hf_numel(self) -> int:
        n = sum(math.prod(s) for s in self.hf_shapes)
        return n + len(self.aliases) * math.prod(self.hf_shapes[0])

    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)


@dataclass(frozen=True)
class Bucket:
    """Consecutive items of one stage moved together: one TP (expert buckets: expert-TP, then
    EP) all-gather and one PP broadcast."""

    stage: int
    items: tuple[int, ...]
    hf_numel: int
    expert: bool = False


@dataclass(frozen=True)
class SyncPlan:
    items: tuple[PlanItem, ...]
    buckets: tuple[Bucket, ...]
    tp: int
    pp: int
    ep: int = 1
    etp: int = 1

    def hf_names(self) -> list[str]:
        return [n for it in self.items for n in it.hf_names + it.aliases]

    def bucket_tensors(self, bucket: Bucket, *, ep_rank: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """The bucket's HF tensors in the order of its flat buffer: item by item (aliases after
        their item); in an expert bucket, EP rank by EP rank (what the EP all-gather lays out),
        item by item within, or only ``ep_rank``'s experts (an expert-parallel engine)."""
        items = [self.items[i] for i in bucket.items]
        if not bucket.expert:
            return [(n, s) for it in items for n, s in
                    list(zip(it.hf_names, it.hf_shapes)) + [(a, it.hf_shapes[0]) for a in it.aliases]]
        copies = range(self.ep) if ep_rank is None else [ep_rank]
        return [(n, s) for copy in copies for it in items
                for n, s in zip(it.copy_names(copy), it.copy_shapes())]

    def received_bytes(self, stage: int, *, element_size: int, engine_expert_parallel: bool = False) -> int:
        """Bytes one rank of ``stage`` receives over collectives in a sync: the other TP (expert
        TP) ranks' shards, the other EP ranks' regrouped experts (not for an expert-parallel
        engine), the other stages' buckets."""
        total = 0
        for bucket in self.buckets:
            if bucket.stage != stage:
                share = self.ep if bucket.expert and engine_expert_parallel else 1
                total += bucket.hf_numel // share
                continue
            for i in bucket.items:
                it = self.items[i]
                split = self.etp if it.is_expert else self.tp
                if it.shard_dim is not None:
                    total += it.shard_numel() * (split - 1)
                if it.is_expert and not engine_expert_parallel:
                    total += it.copy_numel() * (self.ep - 1)
        return total * element_size

    def describe(self) -> str:
        lines = [f"sync plan: {len(self.items)} parameters -> {len(self.hf_names())} HF tensors in "
                 f"{len(self.buckets)} buckets (tp={self.tp}, pp={self.pp}, ep={self.ep}, etp={self.etp})"]
        for b, bucket in enumerate(self.buckets):
            for i in bucket.items:
                it = self.items[i]
                group = "etp" if it.is_expert else "tp"
                split = "replicated" if it.shard_dim is None else f"{group}-split dim {it.shard_dim}"
                gather = f" x ep {it.ep_copies}" if it.is_expert else ""
                lines.append(f"  bucket {b:3d} stage {it.stage} {it.mcore_name} {list(it.shard_shape)} "
                             f"{split}{gather} --{it.layout}--> {', '.join(it.hf_names + it.aliases)}")
        return "\n".join(lines)


def _shard_shape(row: Param, shapes: dict, *, tp: int, padded_vocab: int) -> tuple[tuple[int, ...], int | None]:
    full = list(shapes.values())
    if row.layout == REPLICATED:
        return tuple(full[0]), None
    if row.layout == ROW:
        rows, cols = full[0]
        return (rows, cols // tp), 1
    if row.layout == VOCAB:
        return (padded_vocab // tp,) + tuple(full[0][1:]), 0
    if row.layout in (QKV, GATE_UP):
        total = sum(s[0] for s in full)
        return (total // tp,) + tuple(full[0][1:]), 0
    return (full[0][0] // tp,) + tuple(full[0][1:]), 0  # COLUMN


def plan_sync(arch: ArchConfig, *, tp: int, pp: int, padded_vocab: int, bucket_bytes: int,
              element_size: int = 4, ep: int = 1, etp: int | None = None) -> SyncPlan:
    """Plan moving a model split ``tp`` x ``pp`` (experts ``ep`` x ``etp``, ``None``: ``tp``) into
    an engine, as HF tensors, bucket by bucket.

    Layers are split evenly over stages (megatron's default); a bucket never spans stages, never
    mixes expert and other parameters, and holds at most ``bucket_bytes`` of gathered HF tensors
    (a larger single tensor gets its own).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    etp = tp if etp is None else etp
    arch.check_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    family = arch.family
    per_stage = arch.num_layers // pp
    num_local = arch.num_experts // ep if arch.is_moe else 0
    items: list[PlanItem] = []

    def add(stage, mcore_name, row, hf_names, aliases=()):
        shapes = dict(zip(row.hf, hf_shapes(row, arch).values()))
        shard, dim = _shard_shape(row, shapes, tp=tp, padded_vocab=padded_vocab)
        items.append(PlanItem(stage, mcore_name, row.layout, tuple(hf_names),
                              tuple(shapes[n] for n in row.hf), shard, dim, tuple(aliases)))

    def add_expert(stage, local_layer, layer, row, local_expert):
        shapes = tuple(hf_shapes(row, arch).values())
        shard, dim = _shard_shape(row, dict(zip(row.hf, shapes)), tp=etp, padded_vocab=padded_vocab)
        names = [HF_LAYER_PREFIX.format(layer=layer) + n for r in range(ep)
                 for n in row.hf_names(expert=r * num_local + local_expert)]
        items.append(PlanItem(stage, MCORE_LAYER_PREFIX.format(layer=local_layer)
                              + row.mcore_name(local_expert=local_expert),
                              row.layout, tuple(names), shapes * ep, shard, dim, (), ep))

    globals_ = {p.mcore: p for p in family.global_params}
    emb = globals_["embedding.word_embeddings.weight"]
    add(0, emb.mcore, emb, emb.hf, aliases=("lm_head.weight",) if arch.tie_word_embeddings else ())
    for stage in range(pp):
        for local in range(per_stage):
            layer = stage * per_stage + local
            for row in family.layer_params:
                if row.per_expert:
                    for local_expert in range(num_local):
                        add_expert(stage, local, layer, row, local_expert)
                    continue
                add(stage, MCORE_LAYER_PREFIX.format(layer=local) + row.mcore, row,
                    [HF_LAYER_PREFIX.format(layer=layer) + n for n in row.hf])
    norm = globals_["decoder.final_layernorm.weight"]
    add(pp - 1, norm.mcore, norm, norm.hf)
    if not arch.tie_word_embeddings:
        head = globals_["output_layer.weight"]
        add(pp - 1, head.mcore, head, head.hf)

    buckets: list[Bucket] = []
    current: list[int] = []
    numel = 0
    limit = max(1, bucket_bytes // element_size)
    for i, it in enumerate(items):
        if current and (items[current[0]].stage != it.stage or items[current[0]].is_expert != it.is_expert
                        or numel + it.hf_numel() > limit):
            buckets.append(Bucket(items[current[0]].stage, tuple(current), numel, items[current[0]].is_expert))
            current, numel = [], 0
        current.append(i)
        numel += it.hf_numel()
    if current:
        buckets.append(Bucket(items[current[0]].stage, tuple(current), numel, items[current[0]].is_expert))
    return SyncPlan(tuple(items), tuple(buckets), tp, pp, ep, etp)


# --- engine shards ------------------------------------------------------------------------------
# An engine of tensor-parallel size E holds, on engine rank e, vLLM's shard of every HF tensor.
# vLLM's layers split them as megatron does (q/k/v by heads, gate/up by rows, o/down by columns),
# with two differences the plan must follow: its vocabulary is padded to a multiple of 64 (not
# 128 x TP), and with E > num_key_value_heads each K/V head is replicated on E / K ranks.

VLLM_VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE (VocabParallelEmbedding, ParallelLMHead)


@dataclass(frozen=True)
class EngineSlice:
    """The part of one HF tensor an engine rank holds: ``size`` rows (``dim`` 0) or columns
    (``dim`` 1) from ``start``; ``dim`` None: the whole tensor (replicated)."""

    dim: int | None
    start: int
    size: int

    def take(self, t):
        return t if self.dim is None else t.narrow(self.dim, self.start, self.size)

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        return tuple(self.size if d == self.dim else n for d, n in enumerate(full))


def check_engine_tp(arch: ArchConfig, engine_tp: int, what: str = "rollout.tp") -> None:
    """Raise a ValueError naming ``what`` if vLLM cannot split ``arch`` over ``engine_tp`` ranks."""
    if engine_tp < 1:
        raise ValueError(f"{what} must be >= 1, got {engine_tp}")
    if engine_tp > 1 and arch.is_moe:
        raise ValueError(f"{what}={engine_tp}: engines of a mixture-of-experts model run at TP 1 (the bridge "
                         "hands them every expert, or only their own with an expert-parallel engine); "
                         "engine TP > 1 is not built for experts yet")
    k = arch.num_kv_heads
    checks = (("num_attention_heads", arch.num_attention_heads % engine_tp == 0, arch.num_attention_heads),
              ("intermediate_size", arch.ffn_hidden_size % engine_tp == 0, arch.ffn_hidden_size),
              ("num_key_value_heads (or a multiple of it)", k % engine_tp == 0 or engine_tp % k == 0, k))
    for name, ok, value in checks:
        if not ok:
            raise ValueError(f"{what}={engine_tp}: the engine cannot split {name}={value} over {engine_tp} ranks")


def engine_slice(arch: ArchConfig, layout: str, index: int, full: tuple[int, ...], *, engine_tp: int,
                 engine_rank: int) -> EngineSlice:
    """Engine rank ``engine_rank``'s part of the ``index``-th HF tensor (shape ``full``) of a
    family-table row laid out as ``layout``."""
    if engine_tp == 1 or layout == REPLICATED:
        return EngineSlice(None, 0, full[0])
    if layout == ROW:
        per = full[1] // engine_tp
        return EngineSlice(1, engine_rank * per, per)
    if layout == VOCAB:
        per = math.ceil(arch.vocab_size / VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING // engine_tp
        start = min(engine_rank * per, arch.vocab_size)
        return EngineSlice(0, start, min(start + per, arch.vocab_size) - start)
    if layout == QKV and index > 0:  # k, v: whole heads, replicated when E > num_kv_heads
        hd, k = arch.head_dim, arch.num_kv_heads
        heads = max(1, k // engine_tp)
        owner = engine_rank * k // engine_tp if engine_tp > k else engine_rank
        return EngineSlice(0, owner * heads * hd, heads * hd)
    per = full[0] // engine_tp  # COLUMN, GATE_UP (each half), q
    return EngineSlice(0, engine_rank * per, per)


def engine_slices(plan: SyncPlan, arch: ArchConfig, *, engine_tp: int, engine_rank: int) -> list[tuple[EngineSlice, ...]]:
    """Per plan item, the slice of each of its HF tensors (then its aliases) that engine rank holds."""
    out = []
    for it in plan.items:
        shapes = list(it.hf_shapes) + [it.hf_shapes[0]] * len(it.aliases)
        indices = list(range(len(it.hf_names))) + [0] * len(it.aliases)  # an alias is a copy of tensor 0
        out.append(tuple(engine_slice(arch, it.layout, j, s, engine_tp=engine_tp, engine_rank=engine_rank)
                         for j, s in zip(indices, shapes)))
    return out


def engine_share_numel(plan: SyncPlan, arch: ArchConfig, *, engine_tp: int, engine_rank: int) -> int:
    """Elements an engine rank receives per sync (the full-copy scheme: ``sum(hf_numel)``)."""
    return sum(math.prod(sl.shape(s)) for it, sls in zip(plan.items, engine_slices(plan, arch, engine_tp=engine_tp,
                                                                                    engine_rank=engine_rank))
               for sl, s in zip(sls, list(it.hf_shapes) + [it.hf_shapes[0]] * len(it.aliases)))


def local_engine_shares(plan: SyncPlan, *, engine_tp: int) -> bool:
    """Whether every rank's engine share of the non-vocabulary tensors is in what it holds of the
    model, so that they need no collective: one pipeline stage, and engine TP = trainer TP (the
    engine groups are then the trainer's TP groups, rank for rank) or trainer TP 1 (every rank
    holds whole tensors). At engine TP = trainer TP the vocabulary, padded differently by megatron
    and vLLM, may cross ranks (:func:`vocab_rows_local`)."""
    return plan.pp == 1 and plan.tp in (1, engine_tp)


def vocab_rows_local(arch: ArchConfig, *, tp: int, padded_vocab: int) -> bool:
    """Whether, at engine TP = trainer TP = ``tp``, every rank's engine vocabulary rows lie in its
    own megatron shard (``padded_vocab`` / ``tp`` rows): true when the two paddings split the
    vocabulary alike (e.g. 152064 or 32000 at TP 2), so the vocabulary needs no gather either."""
    per = padded_vocab // tp
    for rank in range(tp):
        sl = engine_slice(arch, VOCAB, 0, (arch.vocab_size, arch.hidden_size), engine_tp=tp, engine_rank=rank)
        if sl.size and not rank * per <= sl.start <= sl.start + sl.size <= (rank + 1) * per:
            return False
    return True
