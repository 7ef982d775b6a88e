"""Distributed set-up: device/backend choice (the only place), process-group bundles per model, and
which ranks of the job are still alive when one fails."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
import torch.distributed as dist

from megatron_opd import cpu_compat


def cuda_available() -> bool:
    return torch.cuda.is_available()


# The dry run's rehearsal computes on fake tensors of a stand-in device (see stand_in_device).
_STAND_IN: list[torch.device] = []


def device() -> torch.device:
    """The device this process computes on: its local GPU under CUDA, else the CPU (within
    :func:`stand_in_device`, the stand-in)."""
    if _STAND_IN:
        return _STAND_IN[-1]
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def stand_in_device(stand_in: torch.device):
    """Within: :func:`device` answers ``stand_in``. The dry run's rehearsal runs the real step on
    fake tensors of the ``meta`` device standing in for the GPU (``train/rehearsal.py``)."""
    _STAND_IN.append(torch.device(stand_in))
    try:
        yield
    finally:
        _STAND_IN.pop()


def backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def lockstep_count(count: int) -> int:
    """The largest ``count`` over the world (collective): how many forwards every data-parallel
    replica must run when expert-parallel peers, which sit in different replicas and exchange
    tokens in every MoE layer, forward in lockstep."""
    t = torch.tensor(count, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def init_distributed(*, timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed from torchrun's environment (a 1-rank group when run bare).

    Picks NCCL + the local GPU when CUDA is present, gloo + CPU otherwise, and on CPU applies the
    megatron-core compatibility layer. Idempotent.
    """
    if dist.is_initialized():
        return
    listening = None
    if "RANK" not in os.environ:
        listening = _listen("127.0.0.1", 0)
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(listening.getsockname()[1])})
    if _one_host() and "GLOO_SOCKET_IFNAME" not in os.environ \
            and LOOPBACK_INTERFACE in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = LOOPBACK_INTERFACE  # gloo's sockets on loopback
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # torchrun's restarts (--max-restarts) reuse its store: without a prefix per attempt, the new
    # workers read the dead ones' connection keys for every process group and fail to connect.
    store, rank, world_size = _rendezvous(timeout, listening)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"megatron_opd/attempt_{attempt}", store)
    dist.init_process_group(backend=backend(), store=store, rank=rank, world_size=world_size, timeout=timeout)
    if world_size > 1:
        _register_member(store, rank, world_size)
    if not cuda_available():
        cpu_compat.apply()


LOOPBACK_INTERFACE = "lo"


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _one_host() -> bool:
    """Whether every rank of the job runs on this host (as the launcher says, or, without a
    LOCAL_WORLD_SIZE, as a loopback MASTER_ADDR implies)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"]) >= int(os.environ["WORLD_SIZE"])
    return _is_loopback(os.environ.get("MASTER_ADDR", ""))


def _rendezvous(timeout: datetime.timedelta, listening: socket.socket | None) -> tuple[dist.Store, int, int]:
    """The job's store: torchrun's agent store, or one that rank 0 hosts at MASTER_ADDR:MASTER_PORT.
    Ours listens on that address only when it is a loopback one (a job on one host), instead of on
    every interface as torch's env:// store does; a multi-host job (MASTER_ADDR a host name) needs
    every interface."""
    host = os.environ["MASTER_ADDR"]
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not _is_loopback(host):
        return next(dist.rendezvous("env://", timeout=timeout))
    rank, world_size, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if rank == 0 and listening is None:
        listening = _listen(socket.gethostbyname(host), port)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listening.detach() if rank == 0 else None)
    return store, rank, world_size


# --- who is alive: each rank registers its host and pid in the job's store (and, when the job
# spans hosts, bumps a heartbeat counter); after a failure, the survivors name the lost ranks.

HEARTBEAT_S = 2.0


@dataclass
class _Members:
    store: dist.Store
    rank: int
    world_size: int
    stop: threading.Event = field(default_factory=threading.Event)


_MEMBERS: _Members | None = None


def _whoami() -> dict:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")  # pids compare only within one namespace
    except OSError:
        pid_ns = ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": pid_ns}


def _register_member(store: dist.Store, rank: int, world_size: int) -> None:
    global _MEMBERS
    store.set(f"members/{rank}", json.dumps(_whoami()))
    _MEMBERS = _Members(store, rank, world_size)
    if not _one_host():  # ranks on other hosts are checked by heartbeat
        threading.Thread(target=_heartbeat, args=(_MEMBERS,), daemon=True, name="megatron-opd-heartbeat").start()


def _heartbeat(m: _Members) -> None:
    while not m.stop.is_set():
        try:
            m.store.add(f"heartbeat/{m.rank}", 1)
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending
            return
        m.stop.wait(HEARTBEAT_S)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True
    except OSError:
        return False


def lost_ranks(*, wait_s: float = 2.5 * HEARTBEAT_S) -> list[str]:
    """After a failure in a multi-rank job: the ranks whose process is gone, each as "rank N (...)".
    Ranks on this host are checked by pid (at once); ranks on other hosts by their heartbeat, which
    takes up to ``wait_s``. Empty when nothing is found lost (or this is a one-rank job)."""
    m = _MEMBERS
    if m is None:
        return []
    me = _whoami()
    try:
        members = {r: json.loads(m.store.get(f"members/{r}")) for r in range(m.world_size)
                   if r != m.rank and m.store.check([f"members/{r}"])}
    except Exception:  # noqa: BLE001 - the store itself is gone
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return []
        return [f"rank 0 (it hosts the job's store at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}, which no longer answers)"]
    local = {r: v for r, v in members.items() if (v["host"], v["pid_ns"]) == (me["host"], me["pid_ns"])}
    lost = [f"rank {r} (pid {v['pid']} on {v['host']} has exited)" for r, v in sorted(local.items())
            if _exited(v["pid"])]
    remote = sorted(set(members) - set(local))
    if lost or not remote or wait_s <= 0:
        return lost
    try:
        before = {r: m.store.add(f"heartbeat/{r}", 0) for r in remote}
        time.sleep(wait_s)
        after = {r: m.store.add(f"heartbeat/{r}", 0) for r in remote}
    except Exception:  # noqa: BLE001
        return []
    return [f"rank {r} (on {members[r]['host']}: no heartbeat for {wait_s:.0f} s)" for r in remote
            if after[r] == before[r]]


# Teardowns of libraries that joined the world group (vLLM's engines), run before it goes.
_BEFORE_SHUTDOWN: list[Callable[[], None]] = []


def before_shutdown(teardown: Callable[[], None]) -> None:
    """Have :func:`shutdown_distributed` call ``teardown`` (once) before it destroys any process
    group: whatever joins the world group with groups of its own registers how to leave it."""
    if teardown not in _BEFORE_SHUTDOWN:
        _BEFORE_SHUTDOWN.append(teardown)


def shutdown_distributed() -> None:
    """Run the registered teardowns (newest first), then tear down megatron's groups and the world group."""
    from megatron.core import parallel_state

    global _MEMBERS
    if _MEMBERS is not None:
        _MEMBERS.stop.set()
        _MEMBERS = None
    while _BEFORE_SHUTDOWN:
        _BEFORE_SHUTDOWN.pop()()
    _SINGLETONS.clear()  # groups of the world about to go
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
