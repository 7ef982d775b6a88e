"""megatron DDP + megatron optimizer for the trained model, one forward/backward over micro-batches,
and the guard that applies an update only when every loss and gradient is finite."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.schedule import OutputFn, run_schedule
from megatron_opd.utils import log0


@dataclass
class Trainable:
    """The trained model with its DDP wrapper, optimizer and learning-rate schedule."""

    model: ShardedModel
    ddp: torch.nn.Module
    optimizer: object
    schedule: Callable[[int], float]  # step -> learning rate

    def set_learning_rate(self, step: int) -> float:
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def make_trainable(model: ShardedModel, optim, *, schedule: Callable[[int], float]) -> Trainable:
    """Wrap ``model`` in megatron's DDP and build megatron's Adam over it with the settings of
    ``optim`` (the ``optim`` config section, :class:`megatron_opd.config.OptimConfig`).

    The loss is a per-token sum: megatron divides gradients by the number of loss tokens in the
    whole global batch (all micro-batches, all data-parallel replicas).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if not model.mp.uses_global_state:
        raise ValueError("the trained model must live on megatron's global parallel state")
    config = model.config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        average_in_collective=False)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model.module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                        weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
                        adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps, clip_grad=optim.clip_grad,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=optim.use_distributed_optimizer),
        [ddp])
    return Trainable(model=model, ddp=ddp, optimizer=optimizer, schedule=schedule)


def zero_grads(t: Trainable) -> None:
    t.ddp.zero_grad_buffer()
    t.optimizer.zero_grad()


def forward_backward(t: Trainable, micro_batches: list[dict], output_fn: OutputFn) -> list[dict]:
    """Zero grads, then forward+backward over all micro-batches (grads reduced, token-scaled)."""
    zero_grads(t)
    t.model.module.train()
    return run_schedule(t.model, micro_batches, output_fn, forward_only=False, ddp_module=t.ddp)


def optimizer_step(t: Trainable) -> tuple[bool, float | None]:
    """Apply the optimizer; returns (applied, grad_norm). Not applied on non-finite gradients."""
    update_successful, grad_norm, _ = t.optimizer.step()
    return bool(update_successful), (float(grad_norm) if grad_norm is not None else None)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class NonFiniteGuard:
    """Applies an update only when the losses and gradients of every rank are finite; a skipped
    step zeroes the gradients, and ``max_in_a_row`` skipped steps in a row stop the run."""

    def __init__(self, *, max_in_a_row: int, skipped: int = 0):
        self.max_in_a_row = max_in_a_row
        self.skipped = skipped  # in the whole run (saved in checkpoints)
        self.in_a_row = 0

    def step(self, t: Trainable, outputs: list[dict], *, step: int) -> float | None:
        """The optimizer step if everything is finite; returns the gradient norm (NaN when skipped)."""
        finite = all_finite(t.model, outputs)
        grad_norm = float("nan")
        if finite:
            applied, grad_norm = optimizer_step(t)
            finite = applied and grad_norm is not None and math.isfinite(grad_norm)
        if finite:
            self.in_a_row = 0
            return grad_norm
        self.in_a_row += 1
        self.skipped += 1
        zero_grads(t)
        log0(f"step {step}: non-finite loss or gradient; update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.in_a_row} consecutive steps with a non-finite loss or gradient "
                                 f"(train.max_nonfinite_steps={self.max_in_a_row})")
        return grad_norm


def all_finite(model: ShardedModel, outputs: list[dict]) -> bool:
    """All ranks agree whether every gradient (and every micro-batch's ``loss_sum``) is finite."""
    ok = torch.ones(1, device=parallel.device())
    for o in outputs:
        if not torch.isfinite(o["loss_sum"]).all():
            ok.zero_()
    for p in model.module.parameters():
        g = getattr(p, "main_grad", None)
        if g is not None and not torch.isfinite(g).all():
            ok.zero_()
            break
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
