"""The dry run's GPU rehearsal: the real code of one training step for one rank of each role of a
layout, on fake tensors (torch's ``FakeTensorMode``: shapes, dtypes and devices, no memory) of a
stand-in accelerator, with torch's ``fake`` process group at the recipe's world size.

What runs is what :class:`~megatron_opd.train.loop.Trainer` runs after the rollouts: packing,
the teacher's forward and the delivery of its signals, the student's forward and backward through
megatron's pipeline schedule with the objective, the non-finite guard and megatron's optimizer
step, the weight sync's gather and regroup, and the step's metrics. What stands in for what fake
tensors cannot give (docs/gpu.md lists each with what it leaves out):

- the stand-in accelerator is the ``meta`` device on a CPU-only torch (a CPU build cannot view a
  fake ``cuda`` tensor), the GPU itself where torch has CUDA; megatron's CUDA allocations are routed
  to it (:func:`megatron_opd.cpu_compat.route_cuda_to`);
- integer device tensors made from host data (token ids, a THD pack's ``cu_seqlens``) keep their
  host values, their ops rerun on the host (:meth:`DeviceMemory._follow_values`), so what megatron
  reads back (``.tolist()`` of the sequence lengths) is real and attention runs per sequence;
- any other value read on the host from a fake tensor (``.item()``, ``.tolist()``, ``float()``)
  is 1 (a finite flag, a unit gradient norm), and a truth value (``bool()``) is false: a branch
  taken only on some data (the trainer-vs-rollout log-prob metric of on-policy tokens) is not
  rehearsed;
- object collectives carry host data no fake group has: every rank sends what this rank sends,
  and the teacher's exchange of micro-batch token ids has every student replica hold this
  replica's micro-batches; megatron's gloo groups are fake groups, its coalesced collectives are
  issued one by one, and its pipeline sends activations of one fixed shape;
- attention runs the kernel CUDA would pick, for its memory (:func:`_sdpa_as_on_cuda`).

Every collective and point-to-point op refuses a tensor off the compute device, as NCCL does
("No backend type associated with device type cpu"), and so does a model meeting one: the error
names the op, the tensor and the file:line that issued it. Live bytes on the stand-in device are
counted per phase; the dry run prints them beside the analytic estimate (``train/memory.py``).
The rollout engines (vLLM) cannot run on fake tensors: their budget stays analytic.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from megatron_opd import cpu_compat, parallel
from megatron_opd.models.builder import build_model
from megatron_opd.models.config import ArchConfig
from megatron_opd.models.packing import token_multiple
from megatron_opd.rollout.sync import WeightSync
from megatron_opd.teacher import megatron as megatron_teacher
from megatron_opd.teacher.megatron import MegatronTeacher
from megatron_opd.teacher.signals import Need
from megatron_opd.train.data import Sequence, pack_micro_batches
from megatron_opd.train.memory import GiB
from megatron_opd.train.metrics import step_metrics
from megatron_opd.train.optim import NonFiniteGuard, forward_backward, make_trainable

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_TORCH_DIR = os.path.dirname(torch.__file__)
# Integer device tensors up to this size keep their host values (a packed row's cu_seqlens and
# positions): megatron reads them back to split a THD pack per sequence.
KNOWN_VALUES_LIMIT = 1 << 16


class DeviceError(RuntimeError):
    """A tensor off the compute device met a collective, a point-to-point op or the model."""


def stand_in_device() -> torch.device:
    """The accelerator the rehearsal computes on: the GPU where torch has CUDA, else ``meta``."""
    return torch.device("cuda") if parallel.cuda_available() else torch.device("meta")


def call_site() -> str:
    """``file:line in function`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_TORCH_DIR) or frame.filename == __file__ \
                or frame.filename.endswith(("contextlib.py", "functools.py")):
            continue
        return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"
    return "an unknown place"


def _short(path: str) -> str:
    for marker in ("/megatron_opd/", "/megatron/core/", "/tests/"):
        if marker in path:
            return path[path.index(marker) + 1:]
    return path


def _each(op, outputs_first: bool):
    def issue(*args, **kwargs):
        lists, rest = (args[:2], args[2:]) if outputs_first else (args[:1], args[1:])
        work = None
        for tensors in zip(*lists):
            work = op(*tensors, *rest, **kwargs)[-1] if outputs_first else op(list(tensors), *rest[:2], None,
                                                                               *rest[2:], **kwargs)[-1]
        return work
    return issue


# The coalesced collectives (megatron's DDP issues its bucket reductions so) have no fake kernel:
# the rehearsal issues them one tensor at a time.
_UNCOALESCED = {
    "c10d::allreduce_coalesced_": _each(torch.ops.c10d.allreduce_.default, outputs_first=False),
    "c10d::allgather_into_tensor_coalesced_": _each(torch.ops.c10d._allgather_base_.default, outputs_first=True),
    "c10d::reduce_scatter_tensor_coalesced_": _each(torch.ops.c10d._reduce_scatter_base_.default, outputs_first=True),
}


class DeviceMemory(TorchDispatchMode):
    """Counts the live bytes of tensors on the compute device (and their peak), and refuses a
    collective or point-to-point op given a tensor anywhere else. Host work on host data (a packed
    row's lengths, made from lists) runs for real: only what touches the device is fake,
    and a real host tensor meeting a fake device one is a device mismatch."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.values = WeakTensorKeyDictionary()  # fake tensor -> its host value (see _follow_values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in COLLECTIVE_NAMESPACES:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                    raise DeviceError(
                        f"{call_site()}: {func.name()} got a {t.device.type} tensor {tuple(t.shape)} "
                        f"{t.dtype}; collectives and sends take tensors on the compute device "
                        f"(parallel.device(), {self.device.type} here), as NCCL does")
            if func.name() in _UNCOALESCED:
                return _UNCOALESCED[func.name()](*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            # .item(), bool(), float(), .tolist() of a fake tensor
            if args[0] not in self.values:
                return _one(args[0].dtype)
            with _disable_current_modes():
                return self.values[args[0]].item()
        if not self._on_device(args, kwargs):  # host work on host data: real tensors, real values
            with _disable_current_modes():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self._follow_values(func, args, kwargs, out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device.type:
                self._count(t.untyped_storage())
        return out

    def _follow_values(self, func, args, kwargs, out) -> None:
        """Keep the values of small integer device tensors made from host data (a packed row's
        ``cu_seqlens``, which megatron's RoPE and our attention read back with ``.tolist()``): the
        op reruns on the inputs' host values. An in-place op forgets the values it changes."""
        fakes = [t for t in tree_leaves((args, kwargs)) if _is_fake(t)]
        if func._schema.is_mutable:
            for t in fakes:
                self.values.pop(t, None)
            return
        outs = [t for t in tree_leaves(out) if _is_fake(t)]
        if not outs or any(t.dtype.is_floating_point or t.numel() > KNOWN_VALUES_LIMIT for t in outs) \
                or not all(t in self.values for t in fakes):
            return
        host = tree_map(lambda t: self.values[t] if _is_fake(t) else t, (args, kwargs))
        if "device" in host[1]:
            host[1]["device"] = torch.device("cpu")
        with _disable_current_modes():
            values = func(*host[0], **host[1])
        for t, v in zip(tree_leaves(out), tree_leaves(values)):
            if _is_fake(t) and isinstance(v, torch.Tensor):
                self.values[t] = v

    def _on_device(self, args, kwargs) -> bool:
        """Whether an op is the step's (fake tensors): it takes one, or makes one on the device."""
        wanted = kwargs.get("device")
        if wanted is not None and torch.device(wanted).type != "cpu":
            return True
        return any(_is_fake(t) or t.device.type != "cpu" for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor))

    def _count(self, storage) -> None:
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    @contextlib.contextmanager
    def window(self):
        """Within: ``peak`` is the peak since entering (the live bytes then are ``start``)."""
        before, self.peak = self.peak, self.live
        try:
            yield
        finally:
            self.peak = max(before, self.peak)


class HostReads(TorchFunctionMode):
    """What bypasses the dispatcher, and attention: ``.tolist()`` of a fake tensor gives its
    host values where :class:`DeviceMemory` keeps them, else the stand-in values;
    ``torch.tensor(data, device=...)`` is made on the host, then moved (a fake tensor on the
    device, as any other); ``torch.tensor`` of a list of fake scalars (megatron's grad-norm
    fallback without apex) stacks them on the device; attention runs the kernel CUDA would
    (:func:`_sdpa_as_on_cuda`)."""

    def __init__(self, memory: DeviceMemory):
        super().__init__()
        self.memory = memory

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "tolist" and args and _is_fake(args[0]):
            with _disable_current_modes():
                if args[0] in self.memory.values:
                    return self.memory.values[args[0]].tolist()
                return torch.full(args[0].shape, _one(args[0].dtype)).tolist()
        if func is F.scaled_dot_product_attention and args and _is_fake(args[0]) and args[0].device.type == "meta":
            return _sdpa_as_on_cuda(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and args:
            if any(_is_fake(t) for t in tree_leaves(args[0])):
                out = _stack(args[0])
                return out.to(dtype=kwargs.get("dtype") or out.dtype, device=kwargs.get("device") or out.device)
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                return func(*args, **{k: v for k, v in kwargs.items() if k != "device"}).to(device)
        return func(*args, **kwargs)


def _sdpa_as_on_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA on the ``meta`` stand-in with the kernel CUDA picks, for its memory: flash attention
    (O(L): the output and its log-sum-exp) for a causal bf16/fp16 sequence without a mask (a THD
    pack's attention runs once per sequence); otherwise the math kernel (fp32 scores [heads, L, L]),
    which is what CUDA runs for a mask (a sliding window) with grouped-query attention. (Masked or
    fp32 attention without GQA gets CUDA's memory-efficient kernel, which this over-counts.) On
    meta every kernel decomposes into the math one."""
    if attn_mask is None and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def _stack(data):
    return data if isinstance(data, torch.Tensor) else torch.stack([_stack(d) for d in data])


def _one(dtype: torch.dtype):
    """The value the host reads from a fake tensor (see the module's docstring)."""
    return False if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _all_gather_object(out: list, obj, group=None) -> None:
    for i in range(len(out)):
        out[i] = obj


def _fake_group(new_group):
    """``dist.new_group`` that makes megatron's gloo groups on the fake backend too."""
    def fake_new_group(*args, backend=None, **kwargs):
        return new_group(*args, **kwargs)
    return fake_new_group


def _exchange_alike(my_micro_batches: list[dict], student) -> list[tuple[int, int, dict]]:
    """The teacher's exchange of micro-batches when every student replica holds this one's."""
    wires = [megatron_teacher._wire(mb) for mb in my_micro_batches]
    return [(d, i, w) for d in range(student.dp_size) for i, w in enumerate(wires)]


@contextlib.contextmanager
def fake_world(*, rank: int, world_size: int):
    """This process as ``rank`` of a fake ``world_size``-rank job on fake tensors of the stand-in
    device; yields the :class:`DeviceMemory` counting them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the rehearsal needs a process without torch.distributed initialised")
    device = stand_in_device()
    cpu_compat.apply()
    # the fake backend for host tensors too: the collectives' device check is ours (DeviceMemory)
    dist.init_process_group(f"cpu:fake,{device.type}:fake", store=FakeStore(), rank=rank, world_size=world_size)
    memory = DeviceMemory(device)
    routed = contextlib.nullcontext() if device.type == "cuda" else cpu_compat.route_cuda_to(device)
    stand_ins = {(dist, "all_gather_object"): _all_gather_object, (dist, "new_group"): _fake_group(dist.new_group),
                 (megatron_teacher, "exchange_micro_batches"): _exchange_alike}
    originals = {key: getattr(*key) for key in stand_ins}
    for (owner, name), value in stand_ins.items():
        setattr(owner, name, value)
    try:
        with parallel.stand_in_device(device), routed, FakeTensorMode(allow_non_fake_inputs=True), memory, \
                HostReads(memory), warnings.catch_warnings():
            # megatron's calls of collectives that torch renamed: noise in the dry run's report
            warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
            yield memory
    finally:
        for (owner, name), value in originals.items():
            setattr(owner, name, value)
        parallel.shutdown_distributed()


@dataclass
class RoleReport:
    """What one rank's rehearsal measured: bytes per part (static, then transient peaks)."""

    rank: int
    student_stage: int
    teacher_stage: int | None
    measured: dict[str, float] = field(default_factory=dict)  # GiB
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def synthetic_sequences(cfg, vocab_size: int, *, num_micro_batches: int) -> list[Sequence]:
    """On-policy sequences of the recipe's longest shape (prompt limit plus every turn's new
    tokens) that fill ``num_micro_batches`` rows of ``data.micro_batch_tokens`` exactly (or, when
    one sequence is longer, rows of one sequence each)."""
    r, budget = cfg.rollout, cfg.data.micro_batch_tokens
    longest = max(2, cfg.data.max_prompt_tokens + r.max_turns * r.max_new_tokens)
    if longest >= budget:  # a sequence longer than a micro-batch gets a row of its own
        per_row = [longest]
    else:
        per_row = [longest] * (budget // longest) + ([budget % longest] if budget % longest > 1 else [])
    lengths = per_row * num_micro_batches  # first-fit decreasing packs them into full rows
    seqs = []
    for i, n in enumerate(lengths):
        prompt = max(1, min(cfg.data.max_prompt_tokens, n // 4))
        ids = [(7 * i + j) % vocab_size for j in range(n)]
        seqs.append(Sequence(prompt_index=i, sample_index=0, tokens=ids, prompt_len=prompt,
                             completion_mask=[1] * (n - prompt), rollout_logprobs=[-1.0] * (n - prompt)))
    return seqs


def rehearsal_ranks(cfg, world_size: int) -> list[int]:
    """One rank per role: the first, a middle and the last pipeline stage of the student (TP and
    DP rank 0; the other ranks of a stage are alike), plus a rank of every in-process teacher
    stage (first, middle, last) that those do not cover."""
    def kinds(pp: int) -> list[int]:
        return sorted({0, min(1, pp - 1), pp - 1})

    s = cfg.student
    s_span = s.tp * (world_size // (s.tp * s.pp))  # ranks per student stage
    ranks = {stage * s_span for stage in kinds(s.pp)}
    if cfg.teacher.path and not cfg.teacher.served_url:
        t = cfg.teacher
        t_span = t.tp * (world_size // (t.tp * t.pp))
        covered = {r // t_span for r in ranks}
        ranks |= {stage * t_span for stage in kinds(t.pp) if stage not in covered}
    return sorted(ranks)


def rehearse_rank(cfg, student_arch: ArchConfig, teacher_arch: ArchConfig | None, *, rank: int,
                  world_size: int) -> RoleReport:
    """Build both models and run one step as ``rank`` of ``world_size``; what it measured."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    start = time.perf_counter()
    try:
        with fake_world(rank=rank, world_size=world_size) as memory:
            report = _step(cfg, student_arch, teacher_arch, memory, rank=rank)
    except FakeTensorDeviceMismatchError as e:
        raise DeviceError(f"{_site_of(e)}: tensors on two devices met ({e}); every tensor that meets the "
                          "model is created on the compute device (parallel.device())") from None
    report.seconds = time.perf_counter() - start
    return report


def _site_of(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != __file__:
            return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"
    return "an unknown place"


def _gib(n: float) -> float:
    return n / GiB


def _step(cfg, student_arch: ArchConfig, teacher_arch: ArchConfig | None, memory: DeviceMemory, *,
          rank: int) -> RoleReport:
    mp = parallel.initialize_global_model_parallel(cfg.student.layout, what="student")
    parallel.seed(cfg.train.seed, mp)
    m: dict[str, float] = {}
    live = memory.live
    student = build_model(student_arch, mp, params_dtype=cfg.student.params_dtype, initialize=False)
    m["student parameters"] = memory.live - live
    live = memory.live
    # optim.build, less its check that this machine has CUDA: the rehearsal's device stands in
    trainable = make_trainable(student, cfg.optim,
                               schedule=lambda step: cfg.optim.learning_rate(step, total_steps=cfg.train.steps))
    m["student gradients"] = sum(b.grad_data.numel() * b.grad_data.element_size() for b in trainable.ddp.buffers)
    m["student optimizer"] = memory.live - live - m["student gradients"]
    teacher = None
    report = RoleReport(rank, mp.pp_rank, None)
    if cfg.teacher.path and not cfg.teacher.served_url and teacher_arch is not None:
        live = memory.live
        tmp = parallel.build_model_parallel(cfg.teacher.layout, what="teacher")
        teacher = MegatronTeacher(build_model(teacher_arch, tmp, params_dtype=cfg.teacher.params_dtype, initialize=False),
                                  need=cfg.loss.teacher_need, top_k=cfg.loss.top_k, temperature=cfg.teacher.temperature)
        m["teacher parameters"] = memory.live - live
        report.teacher_stage = tmp.pp_rank
    else:
        report.notes.append("the teacher is served over HTTP: its side and the student's step are not rehearsed")
        report.measured = {k: _gib(v) for k, v in m.items()}
        return report
    teacher_weight = teacher.output_weight(mp) if teacher.need == Need.HIDDEN else None
    objective = cfg.loss.build(student, teacher_output_weight=teacher_weight, teacher_temperature=cfg.teacher.temperature,
                               rollout_temperature=cfg.rollout.temperature)
    # Rows of one length: megatron's pipeline sends activations of the schedule's fixed shape
    # instead of first exchanging each one's shape (a value a fake group cannot carry).
    for model in (student, teacher.model):
        model.config.variable_seq_lengths = False
    _run_step(cfg, student_arch, mp, trainable, teacher, objective, memory, m)
    report.measured = {k: _gib(v) for k, v in m.items()}
    return report


def _run_step(cfg, student_arch, mp, trainable, teacher, objective, memory: DeviceMemory, m: dict) -> None:
    """Trainer.step after the rollouts, phase by phase, measuring each."""
    live = memory.live
    num_micro_batches = max(1, mp.layout.pp)  # 1F1B keeps up to pp micro-batches in flight
    seqs = synthetic_sequences(cfg, student_arch.vocab_size, num_micro_batches=num_micro_batches)
    micro_batches = pack_micro_batches(seqs, budget=cfg.data.micro_batch_tokens, device=parallel.device(),
                                       multiple_of=token_multiple(trainable.model.config))
    m["micro-batches"] = memory.live - live
    with memory.window():
        live = memory.live
        signals = teacher.signals(micro_batches, mp)
        m["teacher forward peak"] = memory.peak - live
    guard = NonFiniteGuard(max_in_a_row=cfg.train.max_nonfinite_steps)
    live = memory.live
    with memory.window():
        trainable.set_learning_rate(0)

        def loss_fn(output, batch):
            return objective(output, batch, signals[batch["index"]])

        with objective.outputs():
            outputs = forward_backward(trainable, micro_batches, loss_fn)
        guard.step(trainable, outputs, step=0)
        m["student update peak"] = memory.peak - live
    m["student optimizer"] += memory.live - live  # Adam's moments, made at the first step
    with memory.window():
        live = memory.live
        for _ in WeightSync(trainable.model, bucket_bytes=cfg.rollout.bucket_bytes).iter_hf_tensors():
            pass
        m["weight sync peak"] = memory.peak - live
    step_metrics(outputs, seqs, mp)
    m["peak of the step"] = memory.peak
