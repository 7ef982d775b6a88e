"""Distributed set-up: device/backend choice (the only place), and process-group bundles per model."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU under CUDA, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def init_distributed(*, timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed from torchrun's environment (a 1-rank group when run bare).

    Picks NCCL + the local GPU when CUDA is present, gloo + CPU otherwise, and on CPU applies the
    megatron-core compatibility layer. Idempotent.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        from megatron_opd.utils import free_port

        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torchrun's restarts (--max-restarts) reuse its store: without a prefix per attempt, the new
    # workers read the dead ones' connection keys for every process group and fail to connect.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend(), store=dist.PrefixStore(f"megatron_opd/attempt_{attempt}", store),
                            rank=rank, world_size=world_size, timeout=timeout)
    if not cuda_available():
        from megatron_opd import cpu_compat

        cpu_compat.apply()


def shutdown_distributed() -> None:
    """Tear down megatron's and (if started) vLLM's groups, then the world group."""
    from megatron.core import parallel_state

    from megatron_opd.rollout.engine import shutdown_vllm_distributed

    shutdown_vllm_distributed()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelLayout:
    """How one model is split: tensor- and pipeline-parallel sizes; data parallel is what is left.

    Mixture-of-experts layers are split their own way over the same ranks (megatron's expert
    groups): ``ep`` ranks hold disjoint experts, each expert split ``etp`` ways (expert tensor
    parallel; ``None``: the same as ``tp``), and the rest of a stage's ranks are expert data
    parallel. Dense models ignore ``ep`` and ``etp``.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int, *, what: str = "model") -> int:
        for name, value in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("etp", self.expert_tp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{what}.{name} must be a positive integer, got {value!r}")
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"{what}: tp * pp = {self.tp} * {self.pp} = {self.tp * self.pp} does not divide "
                f"the world size {world_size}")
        stage = world_size // self.pp
        if stage % (self.ep * self.expert_tp):
            raise ValueError(
                f"{what}: ep * etp = {self.ep} * {self.expert_tp} = {self.ep * self.expert_tp} does not "
                f"divide the {stage} ranks of a pipeline stage (world size {world_size} / pp {self.pp})")
        return world_size // (self.tp * self.pp)

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.pp * self.ep * self.expert_tp)


@dataclass
class ModelParallel:
    """The process groups one model runs on, passed explicitly to whatever needs them.

    Ranks are laid out as megatron-core does by default (tp fastest, then dp, then pp):
    ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``; expert layers, over the same ranks:
    ``rank = etp_rank + etp * (ep_rank + ep * (edp_rank + edp * pp_rank))``.
    """

    layout: ParallelLayout
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    embd_group: dist.ProcessGroup | None
    pos_embd_group: dist.ProcessGroup | None
    ep_group: dist.ProcessGroup
    expt_tp_group: dist.ProcessGroup
    expt_dp_group: dist.ProcessGroup
    tp_ep_group: dist.ProcessGroup  # expert tensor x expert parallel
    tp_ep_pp_group: dist.ProcessGroup
    tp_dp_group: dist.ProcessGroup  # the ranks of one pipeline stage
    uses_global_state: bool = False
    _pg_collection: object = field(default=None, repr=False)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group)

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @property
    def etp_rank(self) -> int:
        return dist.get_rank(self.expt_tp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def global_rank(self, *, tp_rank: int, pp_rank: int, dp_rank: int | None = None) -> int:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return tp_rank + self.layout.tp * (dp_rank + self.dp_size * pp_rank)

    @cached_property
    def pg_collection(self):
        """The megatron-core ``ProcessGroupCollection`` for building a ``GPTModel`` on these groups."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        if self.uses_global_state:
            return ProcessGroupCollection.use_mpu_process_groups()
        # cp is size one: the tp group stands in for tp x cp, the dp group for dp x cp.
        return ProcessGroupCollection(
            tp=self.tp_group, pp=self.pp_group, mp=self.mp_group, embd=self.embd_group,
            pos_embd=self.pos_embd_group, cp=_singleton_group(), tp_cp=self.tp_group, dp=self.dp_group,
            dp_cp=self.dp_group, ep=self.ep_group, expt_tp=self.expt_tp_group, tp_ep=self.tp_ep_group,
            tp_ep_pp=self.tp_ep_pp_group, expt_dp=self.expt_dp_group, tp_dp_cp=self.tp_dp_group)


_SINGLETONS: dict[int, dist.ProcessGroup] = {}


def _singleton_group() -> dist.ProcessGroup:
    rank = dist.get_rank()
    if rank not in _SINGLETONS:
        # new_group is collective over the whole world: every rank creates every singleton.
        for r in range(dist.get_world_size()):
            group = dist.new_group([r])
            if r == rank:
                _SINGLETONS[rank] = group
    return _SINGLETONS[rank]


def initialize_global_model_parallel(layout: ParallelLayout, *, what: str = "model") -> ModelParallel:
    """Initialise megatron-core's global parallel state for ``layout`` (the trained model).

    megatron's pipeline schedules, DDP and optimizer read the global state, so the model that
    trains lives there. Other models (a teacher on its own TP/PP) use :func:`build_model_parallel`.
    """
    from megatron.core import parallel_state as mpu

    layout.data_parallel_size(dist.get_world_size(), what=what)
    if mpu.model_parallel_is_initialized():
        destroy_global_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                  pipeline_model_parallel_size=layout.pp,
                                  expert_model_parallel_size=layout.ep,
                                  expert_tensor_parallel_size=layout.expert_tp)
    return ModelParallel(
        layout=layout,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        mp_group=mpu.get_model_parallel_group(),
        embd_group=mpu.get_embedding_group(check_initialized=False),
        pos_embd_group=mpu.get_position_embedding_group(check_initialized=False),
        ep_group=mpu.get_expert_model_parallel_group(),
        expt_tp_group=mpu.get_expert_tensor_parallel_group(),
        expt_dp_group=mpu.get_expert_data_parallel_group(),
        tp_ep_group=mpu.get_expert_tensor_and_model_parallel_group(),
        tp_ep_pp_group=mpu.get_expert_tensor_model_pipeline_parallel_group(),
        tp_dp_group=mpu.get_tensor_and_data_parallel_group(),
        uses_global_state=True,
    )


def destroy_global_model_parallel() -> None:
    """Tear down megatron's global parallel state, its process groups included.

    megatron's ``destroy_model_parallel`` forgets its groups without destroying them (all but
    the gloo copies): every re-initialisation would leak a few dozen process groups, each with
    gloo threads of its own (thousands of threads per rank after a few dozen layouts).
    """
    from megatron.core import parallel_state as mpu
    from torch.distributed import distributed_c10d as c10d

    groups = []
    for value in vars(mpu).values():
        for group in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(group, dist.ProcessGroup) and group is not dist.group.WORLD \
                    and all(group is not g for g in groups):
                groups.append(group)
    mpu.destroy_model_parallel()
    for group in groups:
        if group in c10d._world.pg_map:
            dist.destroy_process_group(group)


def build_model_parallel(layout: ParallelLayout, *, what: str = "model") -> ModelParallel:
    """Create fresh process groups for ``layout`` without touching megatron's global state.

    Collective over the whole world: every rank must call it, in the same order.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    tp, pp = layout.tp, layout.pp
    dp = layout.data_parallel_size(world, what=what)

    def rank_of(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    mine: dict[str, dist.ProcessGroup | None] = {}

    def make(name: str, groups: list[list[int]]) -> None:
        for ranks in groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = group

    make("tp", [[rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    make("pp", [[rank_of(t, d, p) for p in range(pp)] for t in range(tp) for d in range(dp)])
    make("dp", [[rank_of(t, d, p) for d in range(dp)] for t in range(tp) for p in range(pp)])
    make("mp", [[rank_of(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    # Embedding group: first and last stage of each pipeline (ties the word embeddings).
    embd = [sorted({rank_of(t, d, 0), rank_of(t, d, pp - 1)}) for t in range(tp) for d in range(dp)]
    make("embd", embd)
    make("pos_embd", [[rank_of(t, d, 0)] for t in range(tp) for d in range(dp)])
    make("tp_dp", [[rank_of(t, d, p) for d in range(dp) for t in range(tp)] for p in range(pp)])
    # Expert layers: etp fastest, then ep, then expert data parallel, then pp (megatron's order).
    ep, etp = layout.ep, layout.expert_tp
    edp = layout.expert_data_parallel_size(world)

    def expert_rank(t: int, e: int, d: int, p: int) -> int:
        return t + etp * (e + ep * (d + edp * p))

    make("ep", [[expert_rank(t, e, d, p) for e in range(ep)]
                for p in range(pp) for d in range(edp) for t in range(etp)])
    make("expt_tp", [[expert_rank(t, e, d, p) for t in range(etp)]
                     for p in range(pp) for d in range(edp) for e in range(ep)])
    make("expt_dp", [[expert_rank(t, e, d, p) for d in range(edp)]
                     for p in range(pp) for e in range(ep) for t in range(etp)])
    make("tp_ep", [[expert_rank(t, e, d, p) for e in range(ep) for t in range(etp)]
                   for p in range(pp) for d in range(edp)])
    make("tp_ep_pp", [[expert_rank(t, e, d, p) for p in range(pp) for e in range(ep) for t in range(etp)]
                      for d in range(edp)])
    return ModelParallel(layout=layout, tp_group=mine["tp"], pp_group=mine["pp"],
                         dp_group=mine["dp"], mp_group=mine["mp"], embd_group=mine.get("embd"),
                         pos_embd_group=mine.get("pos_embd"), ep_group=mine["ep"],
                         expt_tp_group=mine["expt_tp"], expt_dp_group=mine["expt_dp"],
                         tp_ep_group=mine["tp_ep"], tp_ep_pp_group=mine["tp_ep_pp"],
                         tp_dp_group=mine["tp_dp"])


def seed(value: int, mp: ModelParallel) -> None:
    """Seed the default generator and megatron's model-parallel RNG streams (per TP rank)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(value)
    if cuda_available():
        torch.cuda.manual_seed(value)
    model_parallel_cuda_manual_seed(value, tp_rank=mp.tp_rank, ep_rank=mp.ep_rank,
                                    etp_rank=mp.etp_rank, force_reset_rng=True)
