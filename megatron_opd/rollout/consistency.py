"""Trainer-vs-rollout log-prob agreement: the metric that catches a stale or garbled weight sync."""

from __future__ import annotations

import torch


class RolloutMismatchError(RuntimeError):
    """The engine's log-probs disagree with the trainer's beyond the configured threshold."""


def logprob_mismatch(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Max and mean of ``|trainer - rollout|`` over the (masked) sampled tokens."""
    diff = (trainer_logprobs.detach().double() - rollout_logprobs.detach().double()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    if diff.numel() == 0:
        return 0.0, 0.0
    return diff.max().item(), diff.mean().item()


def check_mismatch(max_abs_diff: float, *, threshold: float | None, version: int | None = None) -> None:
    """Raise if the mismatch exceeds ``threshold`` (None disables the check)."""
    if threshold is not None and not max_abs_diff <= threshold:
        where = f" after weight sync version {version}" if version is not None else ""
        raise RolloutMismatchError(
            f"trainer vs rollout log-prob mismatch {max_abs_diff:.3g} exceeds the threshold "
            f"{threshold:.3g}{where}: the engine is not sampling from the trained weights "
            "(stale cache, partial or garbled sync)")
