"""megatron DDP + megatron optimizer for the trained model, and one optimizer step over micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd import parallel
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.schedule import OutputFn, run_schedule


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False

    def validate(self, *, prefix: str = "optim") -> None:
        if not self.lr > 0:
            raise ValueError(f"{prefix}.lr must be > 0, got {self.lr}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"{prefix}.adam_beta1/adam_beta2 must be in [0, 1)")
        if self.clip_grad < 0:
            raise ValueError(f"{prefix}.clip_grad must be >= 0 (0 disables clipping)")
        if self.use_distributed_optimizer and not parallel.cuda_available():
            raise ValueError(f"{prefix}.use_distributed_optimizer=true needs CUDA (megatron's "
                             "distributed optimizer asserts CUDA tensors); set it to false on CPU")


@dataclass
class Trainable:
    """The trained model with its DDP wrapper and optimizer."""

    model: ShardedModel
    ddp: torch.nn.Module
    optimizer: object


def make_trainable(model: ShardedModel, cfg: OptimConfig) -> Trainable:
    """Wrap ``model`` in megatron's DDP and build megatron's Adam optimizer over it.

    The loss is a per-token sum: megatron divides gradients by the number of loss tokens in the
    whole global batch (all micro-batches, all data-parallel replicas).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg.validate()
    if not model.mp.uses_global_state:
        raise ValueError("the trained model must live on megatron's global parallel state")
    config = model.config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        average_in_collective=False)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model.module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
                        adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=cfg.use_distributed_optimizer),
        [ddp])
    return Trainable(model=model, ddp=ddp, optimizer=optimizer)


def forward_backward(t: Trainable, micro_batches: list[dict], output_fn: OutputFn) -> list[dict]:
    """Zero grads, then forward+backward over all micro-batches (grads reduced, token-scaled)."""
    t.ddp.zero_grad_buffer()
    t.optimizer.zero_grad()
    t.model.module.train()
    return run_schedule(t.model, micro_batches, output_fn, forward_only=False, ddp_module=t.ddp)


def optimizer_step(t: Trainable) -> tuple[bool, float | None]:
    """Apply the optimizer; returns (applied, grad_norm). Not applied on non-finite gradients."""
    update_successful, grad_norm, _ = t.optimizer.step()
    return bool(update_successful), (float(grad_norm) if grad_norm is not None else None)
