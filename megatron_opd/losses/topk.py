"""Divergences over a top-k support plus one tail bucket holding each distribution's remaining mass."""

from __future__ import annotations

import math

import torch

from megatron_opd.losses.vocab_parallel import (LOG_ZERO, LogitRows, VocabShard, column_mask,
                                                combine_logsumexp, exp_and_logsumexp, gather_tokens,
                                                local_columns, log_probs, scale_into, select_topk,
                                                shift_, take_columns, to_compute)


def _tail_logsumexp_(x_cv: torch.Tensor, cols_ck: torch.Tensor, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's ``(max, log sum exp((z - max) / T))`` over the columns not selected.

    Overwrites ``x`` (an own copy of the raw logits).
    """
    x_cv.masked_fill_(column_mask(cols_ck, x_cv.shape[-1]), float("-inf"))
    big = shift_(x_cv, temperature)
    return big, exp_and_logsumexp(x_cv)[1]


def _bucket_logprobs(selected_ck: torch.Tensor, tail: tuple[torch.Tensor, torch.Tensor] | None,
                     temperature: float) -> torch.Tensor:
    """Log-probs of the k selected tokens and (if there is a tail) the rest, ``[c, k (+ 1)]``.

    ``selected_ck`` are raw logits; ``tail`` is the rest's global ``(M, L)`` from
    :func:`combine_logsumexp`.
    """
    big = selected_ck.amax(dim=-1)
    if tail is not None:
        big = torch.maximum(big, torch.where(tail[1] > float("-inf"), tail[0], float("-inf")))
    big = torch.where(big.isfinite(), big, 0.0)
    rel = (selected_ck - big.unsqueeze(-1)) / temperature
    if tail is not None:
        tail_big, tail_lse = tail
        rel = torch.cat([rel, ((tail_big - big) / temperature + tail_lse).unsqueeze(-1)], dim=-1)
    return rel.sub_(torch.logsumexp(rel, dim=-1, keepdim=True)).clamp_min_(LOG_ZERO)


class TopKTail:
    """The divergence between the (k + 1)-bucket coarsenings of both distributions.

    Buckets are the k selected tokens and one "rest" bucket with the remaining mass on each side,
    so the loss is exact for k = vocab_size (there is then no rest bucket). The selection is the
    teacher's or the student's top-k computed vocab-parallel, or given: ids with the teacher's
    log-probs (teacher_logits absent), where the teacher's rest is 1 - sum of its top-k mass,
    floored at the smallest normal float so that reverse KL stays finite.

    With bucket gradients H_b = P_b (g_b - sum_b' P_b' g_b') from the kind's formula, the gradient
    w.r.t. a selected token's s is H_b, and w.r.t. an unselected token j is
    (p_j / P_rest) * H_rest, its share of the rest bucket (computed as exp of a log-ratio, so it
    stays finite when the rest's mass underflows).

    ``tail=False`` drops the rest bucket: a divergence is then taken between both distributions
    renormalized over the k selected tokens (unselected tokens get no gradient); a policy gradient
    (``reverse_kl_advantage``) keeps the full distributions' log-probs of the k tokens and gives
    the rest no advantage (its gradient still reaches every token through the softmax).

    Collectives per chunk (TP > 1), forward only: one all_gather of the local top-k candidates
    (``tp x c x min(k, V_local) x 2``; skipped when ids are given) and one all_gather of per-token
    partials (``tp x c x (k + 4)``: the other side's selected logits and each side's tail
    (max, log-sum-exp); ``k + 2`` when the teacher is given as top-k). The backward has none.
    """

    def __init__(self, divergence, shard: VocabShard, *, temperature: float, dtype: torch.dtype,
                 k: int, select: str, teacher: LogitRows | None = None,
                 teacher_ids_tk: torch.Tensor | None = None,
                 teacher_logprobs_tk: torch.Tensor | None = None, tail: bool = True):
        assert select in ("teacher", "student", "given"), select
        self.shard, self.temperature, self.dtype = shard, temperature, dtype
        self.k, self.select = k, select
        has_rest = k < shard.vocab_size
        # Without the tail bucket a divergence compares both sides renormalized over the k tokens
        # (the unselected get no gradient); a policy gradient keeps the rest bucket to normalize
        # the log-probs of the k and gives it no advantage.
        keeps_rest = getattr(divergence, "needs_rest", False)
        self.has_tail = has_rest and (tail or keeps_rest)
        self.divergence = divergence.without_rest() if has_rest and not tail and keeps_rest else divergence
        self.teacher = teacher
        self.teacher_ids_tk, self.teacher_logprobs_tk = teacher_ids_tk, teacher_logprobs_tk

    def _from_logits(self, x_s: torch.Tensor, rows: slice):
        """Selected ids and bucket log-probs of both sides, with the student's tail (M, L)."""
        k, temperature, t_shard = self.k, self.temperature, self.teacher.shard
        x_t = to_compute(self.teacher(rows), self.dtype)
        if self.select == "teacher":
            ids, t_sel = select_topk(x_t, t_shard, k, self.dtype)
            other_local = take_columns(x_s, local_columns(ids, self.shard))
        else:
            ids, s_sel = select_topk(x_s, self.shard, k, self.dtype)
            other_local = take_columns(x_t, local_columns(ids, t_shard))
        s_tail = _tail_logsumexp_(x_s, local_columns(ids, self.shard), temperature)
        t_tail = _tail_logsumexp_(x_t, local_columns(ids, t_shard), temperature)
        parts = gather_tokens(torch.cat([other_local, torch.stack(s_tail + t_tail, dim=-1)], dim=-1),
                              self.shard)
        other = parts[..., :k].sum(dim=0)  # one rank holds each id, the others sent 0
        s_sel, t_sel = (other, t_sel) if self.select == "teacher" else (s_sel, other)
        s_tail = combine_logsumexp(parts[..., k], parts[..., k + 1], temperature)
        t_tail = combine_logsumexp(parts[..., k + 2], parts[..., k + 3], temperature)
        if not self.has_tail:
            s_tail = t_tail = None
        logq = _bucket_logprobs(t_sel, t_tail, temperature)
        return ids, _bucket_logprobs(s_sel, s_tail, temperature), logq, s_tail

    def _from_given(self, x_s: torch.Tensor, rows: slice):
        k, temperature = self.k, self.temperature
        ids = self.teacher_ids_tk[rows]
        cols = local_columns(ids, self.shard)
        s_local = take_columns(x_s, cols)
        s_tail = _tail_logsumexp_(x_s, cols, temperature)
        parts = gather_tokens(torch.cat([s_local, torch.stack(s_tail, dim=-1)], dim=-1), self.shard)
        s_tail = combine_logsumexp(parts[..., k], parts[..., k + 1], temperature) if self.has_tail else None
        logp = _bucket_logprobs(parts[..., :k].sum(dim=0), s_tail, temperature)
        tiny = torch.finfo(self.dtype).tiny
        logq = self.teacher_logprobs_tk[rows].to(self.dtype).clamp_min(math.log(tiny))
        if not self.has_tail and k < self.shard.vocab_size:  # no tail bucket: renormalized over the k
            logq = (logq - torch.logsumexp(logq, dim=-1, keepdim=True)).clamp_min_(LOG_ZERO)
        elif self.has_tail:
            # 1 - sum exp(logq) cancels when the top-k holds nearly all mass: work in fp64 ([c, k] only).
            rest = (-torch.expm1(torch.logsumexp(logq.double(), dim=-1))).clamp_min(tiny).log()
            logq = torch.cat([logq, rest.to(self.dtype).unsqueeze(-1)], dim=-1)
        return ids, logp, logq, s_tail

    def forward_chunk(self, z_cv: torch.Tensor, rows: slice):
        x_s = to_compute(z_cv, self.dtype)
        if self.select == "given":
            ids, logp, logq, s_tail = self._from_given(x_s, rows)
        else:
            ids, logp, logq, s_tail = self._from_logits(x_s, rows)
        p, q = logp.exp(), logq.exp()
        loss, aux = self.divergence.loss(self.divergence.sums(logp, logq, p, q))
        if s_tail is not None:
            # A rest without mass (every unselected logit -inf) gets share exp(-inf - 0) = 0.
            s_tail = (s_tail[0], torch.where(s_tail[1] > float("-inf"), s_tail[1], 0.0))
        return loss, (ids, self.divergence.grad_(logp, logq, aux), s_tail)

    def grad_chunk(self, z_cv: torch.Tensor, rows: slice, state, scale_c: torch.Tensor,
                   out: torch.Tensor) -> None:
        ids, h_cb, s_tail = state
        n, k = z_cv.shape[-1], self.k
        cols = local_columns(ids, self.shard)
        if s_tail is None:
            grad = z_cv.new_zeros(z_cv.shape, dtype=self.dtype)
        else:
            # Unselected columns: their share of the rest bucket (selected ones would overflow it).
            grad = log_probs(z_cv, *s_tail, self.temperature, self.dtype)
            grad.masked_fill_(column_mask(cols, n), float("-inf")).exp_().mul_(h_cb[:, k:])
        if n:
            # Selected columns: their bucket's gradient (ids held elsewhere add 0 to a clamped column).
            grad.scatter_add_(-1, cols.clamp_max(n - 1), torch.where(cols < n, h_cb[:, :k], 0.0))
        scale_into(grad, scale_c, out)
