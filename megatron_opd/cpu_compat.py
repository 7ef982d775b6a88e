"""The megatron-core CPU shims: applied once per process, only when CUDA is absent.

megatron-core 0.16.1 assumes a GPU in a few places that have nothing to do with the math:
`torch.cuda.current_device()` as an allocation device, `torch.cuda.synchronize()`, about a dozen
modules that allocate with a hard-coded ``device="cuda"``, a gradient-clipping helper that asserts
CUDA tensor types, a bf16 optimizer that accepts parameters by CUDA type name, and an RNG tracker
built on the CUDA generator; in mixture-of-experts layers, the router's gemm reads Transformer
Engine's ``te_general_gemm`` (undefined without TE) and the all-to-all token dispatcher moves its
split sizes to the host on a side CUDA stream and, at expert tensor parallel > 1, gathers and
reduce-scatters uneven token counts (which gloo's list collectives refuse). This module routes all
of them to the CPU. It patches private internals, so megatron-core is pinned exactly and
``tests/test_cpu_compat.py`` is the canary that fails loudly when an upgrade breaks a shim.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import re
import types
import warnings

import torch

# Modules that allocate with a literal device="cuda" in megatron-core 0.16.1 (found by grep).
CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.distributed.param_and_grad_buffer",
)

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "randn", "rand", "randint", "triu", "tril", "as_tensor")

_applied = False
# Where megatron's CUDA allocations go: the CPU, or (within :func:`route_cuda_to`, the dry run's
# rehearsal) a stand-in device.
_ROUTE: list = ["cpu"]


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"):
        return _ROUTE[-1]
    return device


@contextlib.contextmanager
def route_cuda_to(device: torch.device):
    """Within: what the shims send to the CPU (megatron's ``device="cuda"`` allocations,
    ``torch.cuda.current_device()``, ``Tensor.cuda()``) goes to ``device`` instead. The dry run's
    rehearsal runs the step on fake tensors of a stand-in accelerator this way. Needs :func:`apply`."""
    if not _applied:
        raise RuntimeError("cpu_compat.route_cuda_to needs the CPU shims (cpu_compat.apply())")
    _ROUTE.append(device)
    cuda, own_type = torch.Tensor.cuda, torch.Tensor.__dict__.get("type")
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)
    # megatron's optimizers accept parameters by CUDA type name: the stand-in's tensors answer so
    torch.Tensor.type = _cuda_type_names(torch.Tensor.type, kinds=(device.type,))
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda
        if own_type is None:
            del torch.Tensor.type
        else:
            torch.Tensor.type = own_type
        _ROUTE.pop()


class _CpuTorch(types.ModuleType):
    """Stand-in for the ``torch`` name inside one megatron module: factory calls that ask for
    ``device="cuda"`` get the CPU; ``overrides`` replace whole attributes (``torch.cuda``,
    ``torch.distributed``); everything else is torch itself."""

    def __init__(self, **overrides):
        super().__init__("torch")
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return __f(*args, **kwargs)
            return factory
        return attr


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` on the CPU generator (same semantics:
    named states forked in and out of the default generator)."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig = self.states_[orig_name]
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


class _HostStream:
    """A CUDA stream (and its events) on the CPU, where every operation is already synchronous."""

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()

# What megatron's all-to-all token dispatcher uses of torch.cuda (its host copies of the split
# sizes run on a side stream).
_DISPATCHER_CUDA = types.SimpleNamespace(
    Stream=lambda *args, **kwargs: _HostStream(),
    current_stream=lambda *args, **kwargs: _HOST_STREAM,
    stream=lambda stream: contextlib.nullcontext(),
)


class _UnevenCollectives(types.ModuleType):
    """``torch.distributed`` with the two list collectives that gloo runs only on equal sizes,
    for uneven ones: megatron's all-to-all token dispatcher gathers and reduce-scatters a
    different number of tokens per expert tensor-parallel rank (NCCL does that natively). The
    uneven case pads every part to the largest, runs the equal-size collective, and slices."""

    def __init__(self):
        super().__init__("torch.distributed")

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        dist = torch.distributed
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in tensor_list]
        dist.all_gather(parts, padded, group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part[: out.shape[0]])
        return None

    @staticmethod
    def reduce_scatter(output, input_list, op=None, group=None, async_op=False):
        dist = torch.distributed
        op = dist.ReduceOp.SUM if op is None else op
        if async_op or all(t.shape == output.shape for t in input_list):
            return dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in input_list)
        stacked = output.new_zeros((len(input_list) * longest,) + tuple(output.shape[1:]))
        for i, part in enumerate(input_list):
            stacked[i * longest: i * longest + part.shape[0]] = part
        mine = output.new_empty((longest,) + tuple(output.shape[1:]))
        dist.reduce_scatter_tensor(mine, stacked, op=op, group=group)
        output.copy_(mine[: output.shape[0]])
        return None


def _to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU: what the CUDA path
    hands on (NumPy split sizes where asked), without the device copy."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of megatron's clip (which asserts CUDA tensors): scale grads by the coefficient."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


# The line of megatron's bf16/fp16 optimizer that sorts parameters by CUDA type name; the shim below
# exists for it (the canary checks that it is still there).
FLOAT16_TYPE_CHECK = "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']"


def _cuda_type_names(real, *, kinds: tuple[str, ...] | None):
    """``Tensor.type`` answering, for a tensor on a device of ``kinds`` (None: any), the CUDA name
    of its dtype: torch.BFloat16Tensor (CPU), torch.meta.BFloat16Tensor -> torch.cuda.BFloat16Tensor."""

    def cuda_type_name(tensor, *type_args, **type_kwargs):
        name = real(tensor, *type_args, **type_kwargs)
        kind = tensor.device.type
        if type_args or type_kwargs or kind == "cuda" or name.startswith("torch.cuda.") \
                or (kinds is not None and kind not in kinds):
            return name
        prefix = f"torch.{kind}." if name.startswith(f"torch.{kind}.") else "torch."
        return "torch.cuda." + name[len(prefix):]

    return cuda_type_name


def _with_cuda_type_names(init):
    """Wrap ``Float16OptimizerWithFloat16Params.__init__`` (megatron's bf16 optimizer: fp32 main
    copies of bf16 parameters), which accepts parameters by their CUDA type names only: while it
    runs, a tensor off CUDA answers ``type()`` with the CUDA name of its dtype
    (``torch.BFloat16Tensor`` -> ``torch.cuda.BFloat16Tensor``)."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        own = torch.Tensor.__dict__.get("type")
        torch.Tensor.type = _cuda_type_names(torch.Tensor.type, kinds=None)
        try:
            init(self, *args, **kwargs)
        finally:
            if own is None:
                del torch.Tensor.type
            else:
                torch.Tensor.type = own

    return wrapped


def _apply_bf16_shims() -> None:
    """bf16 mixed precision on CPU: megatron's bf16 optimizer sorts parameters by CUDA type name
    (the rest of the bf16 path, DDP's fp32 gradient buffers and the fp32 main-parameter copies,
    runs unchanged: its hard-coded CUDA allocations are routed with the other modules')."""
    import inspect

    from megatron.core.optimizer import optimizer

    cls = optimizer.Float16OptimizerWithFloat16Params
    if FLOAT16_TYPE_CHECK not in inspect.getsource(cls.__init__):
        raise RuntimeError("cpu_compat: megatron's Float16OptimizerWithFloat16Params no longer sorts "
                           "parameters by CUDA type name; re-check the bf16 shim against this "
                           "megatron-core version")
    cls.__init__ = _with_cuda_type_names(cls.__init__)


# megatron-core warns about these on every import on a CPU machine; they are expected here.
KNOWN_CPU_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "When using async grad allreduce it is recommended",
    "full scope is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated and will be removed",
)


def quiet_known_warnings() -> None:
    for message in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")


def apply() -> None:
    """Install every shim (idempotent). A no-op when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    quiet_known_warnings()

    torch.cuda.current_device = lambda: _ROUTE[-1]
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by our own seeding
    torch.Tensor.cuda = lambda self, *a, **k: self

    cpu_torch = _CpuTorch()
    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"cpu_compat: {name} no longer imports torch as `torch`; "
                               "re-check the shims against this megatron-core version")
        module.torch = cpu_torch

    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _apply_bf16_shims()

    random.CudaRNGStatesTracker = CpuRNGStatesTracker
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if getattr(moe_utils, "HAVE_TE", False) or hasattr(moe_utils, "te_general_gemm") \
            or token_dispatcher.torch is not torch:
        raise RuntimeError("cpu_compat: megatron-core's MoE modules changed (te_general_gemm or the "
                           "dispatcher's torch); re-check the shims against this megatron-core version")
    moe_utils.te_general_gemm = None  # the router's gemm falls back to torch.mm
    token_dispatcher.torch = _CpuTorch(cuda=_DISPATCHER_CUDA)
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host
    from megatron.core.tensor_parallel import mappings

    if mappings.torch is not torch:
        raise RuntimeError("cpu_compat: megatron.core.tensor_parallel.mappings no longer imports torch "
                           "as `torch`; re-check the shims against this megatron-core version")
    mappings.torch = _CpuTorch(distributed=_UnevenCollectives())
    _applied = True


def is_applied() -> bool:
    return _applied
