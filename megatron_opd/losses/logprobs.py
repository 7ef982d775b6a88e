"""Vocab-parallel log-probabilities of given token ids and top-k, without gathering full logits."""

from __future__ import annotations

import torch

from megatron_opd.losses.vocab_parallel import (ChunkedVocabLoss, VocabShard, check_temperature,
                                                combine_logsumexp, compute_dtype, exp_and_logsumexp,
                                                gather_tokens, local_columns, log_probs,
                                                resolve_chunk_size, scale_into, select_topk,
                                                shifted_logits, take_columns, vocab_shard)


class TokenLogProb:
    """``log softmax(z / T)[y]`` per token; dlog p(y)/ds = onehot(y) - p."""

    def __init__(self, shard: VocabShard, ids_t: torch.Tensor, *, temperature: float, dtype: torch.dtype):
        self.shard, self.ids_t, self.temperature, self.dtype = shard, ids_t, temperature, dtype

    def forward_chunk(self, z_cv: torch.Tensor, rows: slice):
        cols = local_columns(self.ids_t[rows].unsqueeze(-1), self.shard)
        picked = take_columns(z_cv, cols)[:, 0].to(self.dtype)  # the raw logit of y on its owner, else 0
        x, m = shifted_logits(z_cv, self.temperature, self.dtype)
        # The only collective: every rank's (max, log-sum-exp, logit of y or 0).
        parts = gather_tokens(torch.stack([m, exp_and_logsumexp(x)[1], picked], dim=-1), self.shard)
        big, lse = combine_logsumexp(parts[..., 0], parts[..., 1], self.temperature)
        return (parts[..., 2].sum(dim=0) - big) / self.temperature - lse, (big, lse)

    def grad_chunk(self, z_cv: torch.Tensor, rows: slice, state, scale_c: torch.Tensor,
                   out: torch.Tensor) -> None:
        big, lse = state
        n = z_cv.shape[-1]
        grad = log_probs(z_cv, big, lse, self.temperature, self.dtype).exp_().neg_()
        if n:
            cols = local_columns(self.ids_t[rows].unsqueeze(-1), self.shard)
            grad.scatter_add_(-1, cols.clamp_max(n - 1), (cols < n).to(grad.dtype))
        scale_into(grad, scale_c, out)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, vocab_size: int | None = None,
                   tp_group=None, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """``log softmax(logits / temperature)[token_ids]`` over the full (sharded) vocabulary.

    ``logits`` is this rank's vocab shard ``[..., V_local]``; ``token_ids`` ``[...]`` are global
    ids in ``[0, vocab_size)``. Returns fp32 ``[...]`` (fp64 for fp64 logits), differentiable
    w.r.t. ``logits`` with an analytic, chunked backward (gradient in the logits' dtype).
    Collectives per chunk over ``tp_group``: one all_gather of ``[chunk, 3]`` (each rank's max,
    log-sum-exp and the logit of the id if it holds it); none in the backward.
    """
    check_temperature(temperature)
    lead = tuple(logits.shape[:-1])
    if tuple(token_ids.shape) != lead:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} != logits leading shape {lead}")
    shard = vocab_shard(logits.shape[-1], vocab_size=vocab_size, tp_group=tp_group, what="logits")
    ids_t = token_ids.reshape(-1).long()
    if ids_t.numel() and (ids_t.min() < 0 or ids_t.max() >= shard.vocab_size):
        raise ValueError(f"token_ids must lie in [0, vocab_size={shard.vocab_size}), got "
                         f"[{ids_t.min().item()}, {ids_t.max().item()}]")
    loss = TokenLogProb(shard, ids_t, temperature=temperature, dtype=compute_dtype(logits.dtype))
    z_tv = logits.reshape(-1, shard.width)
    out = ChunkedVocabLoss.apply(z_tv, loss, None, resolve_chunk_size(chunk_size, shard.width, logits.device))
    return out.view(lead)


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, k: int, *, vocab_size: int | None = None, tp_group=None,
                  temperature: float = 1.0, chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely token ids ``[..., k]`` and their log-probs, best first, from vocab shards.

    Collectives per chunk over ``tp_group``: one all_gather of each rank's top-k candidates
    (values and ids, ``tp x chunk x k x 2``) and one all_gather of ``[chunk, 2]`` (max, log-sum-exp).
    """
    check_temperature(temperature)
    shard = vocab_shard(logits.shape[-1], vocab_size=vocab_size, tp_group=tp_group, what="logits")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k must be an integer in [1, vocab_size={shard.vocab_size}], got {k!r}")
    lead = tuple(logits.shape[:-1])
    dtype = compute_dtype(logits.dtype)
    z_tv = logits.reshape(-1, shard.width)
    chunk = resolve_chunk_size(chunk_size, shard.width, logits.device)
    ids, lps = [], []
    for begin in range(0, z_tv.shape[0], chunk):
        z_cv = z_tv[begin:begin + chunk, :shard.num_valid]
        top_ids, top_vals = select_topk(z_cv, shard, k, dtype)
        x, m = shifted_logits(z_cv, temperature, dtype)
        parts = gather_tokens(torch.stack([m, exp_and_logsumexp(x)[1]], dim=-1), shard)
        big, lse = combine_logsumexp(parts[..., 0], parts[..., 1], temperature)
        ids.append(top_ids)
        lps.append((top_vals - big.unsqueeze(-1)) / temperature - lse.unsqueeze(-1))
    if not ids:
        return z_tv.new_zeros(lead + (k,), dtype=torch.long), z_tv.new_zeros(lead + (k,), dtype=dtype)
    return torch.cat(ids).view(lead + (k,)), torch.cat(lps).view(lead + (k,))
