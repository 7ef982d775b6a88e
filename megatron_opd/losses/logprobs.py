"""Vocab-parallel log-probabilities of given token ids and top-k, without gathering full logits."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _shard_info(logits: torch.Tensor, tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _masked(logits: torch.Tensor, vocab_size: int | None, tp_group) -> torch.Tensor:
    """fp32 logits with padded vocabulary columns (>= vocab_size) set to -inf."""
    rank, _ = _shard_info(logits, tp_group)
    v_local = logits.shape[-1]
    logits = logits.float()
    if vocab_size is not None and (rank + 1) * v_local > vocab_size:
        cols = torch.arange(rank * v_local, (rank + 1) * v_local, device=logits.device)
        logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, vocab_size: int | None = None,
                   tp_group=None, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token_ids] over the full (sharded) vocabulary.

    ``logits`` is this rank's vocab shard ``[..., V_local]``; ``token_ids`` ``[...]`` are global ids.
    Differentiable w.r.t. ``logits``. Collectives: one max and two sums over ``tp_group``.
    """
    rank, _ = _shard_info(logits, tp_group)
    v_local = logits.shape[-1]
    z = _masked(logits, vocab_size, tp_group) / temperature
    local_max = z.detach().max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - local_max.unsqueeze(-1)
    sum_exp = shifted.exp().sum(dim=-1)
    start = rank * v_local
    in_shard = (token_ids >= start) & (token_ids < start + v_local)
    local_ids = (token_ids - start).clamp(0, v_local - 1)
    picked = shifted.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1) * in_shard
    if tp_group is not None:
        sum_exp = _AllReduceSum.apply(sum_exp, tp_group)
        picked = _AllReduceSum.apply(picked, tp_group)
    return picked - sum_exp.log()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each rank's input is the incoming gradient."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, k: int, *, vocab_size: int | None = None, tp_group=None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely token ids and their log-probs, best first, from vocab shards.

    Each rank takes its local top-k; only those k candidates per token (ids and values) and the
    per-token normaliser cross the TP group.
    """
    rank, world = _shard_info(logits, tp_group)
    v_local = logits.shape[-1]
    z = _masked(logits, vocab_size, tp_group) / temperature
    local_max = z.max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = (z - local_max.unsqueeze(-1)).exp().sum(dim=-1)
    if tp_group is not None:
        dist.all_reduce(sum_exp, group=tp_group)
    log_norm = local_max + sum_exp.log()
    k_local = min(k, v_local)
    vals, idx = z.topk(k_local, dim=-1)
    idx = idx + rank * v_local
    if tp_group is not None and world > 1:
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
        vals, idx = torch.cat(all_vals, dim=-1), torch.cat(all_idx, dim=-1)
    best_vals, pos = vals.topk(k, dim=-1)
    return idx.gather(-1, pos), best_vals - log_norm.unsqueeze(-1)
