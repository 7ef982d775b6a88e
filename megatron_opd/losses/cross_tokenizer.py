"""Distillation losses for a teacher with another vocabulary: the exact span-level sampled reverse KL,
and a divergence over the tokens both vocabularies share (plus a tail bucket), vocab-parallel on
both sides.

Spans, their rows and the 1:1 token map come from :mod:`megatron_opd.train.alignment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.losses.divergence import flat_mask
from megatron_opd.losses.kinds import make_divergence
from megatron_opd.losses.logprobs import token_logprobs
from megatron_opd.losses.vocab_parallel import (ChunkedVocabLoss, VocabShard, check_temperature,
                                                combine_logsumexp, compute_dtype, exp_and_logsumexp,
                                                gather_tokens, log_probs, resolve_chunk_size, scale_into,
                                                shift_, shifted_logits, sum_tokens, to_compute, vocab_shard)

# --- the span-level signal ----------------------------------------------------------------------


@dataclass
class SpanSignal:
    """Per student row: ``loss`` (differentiable), ``advantage`` and ``divergence`` (the span's
    log-ratio spread evenly over its student tokens, so that sums over tokens are sums over
    spans); per span: ``log_ratio`` and ``valid``."""

    loss: torch.Tensor
    advantage: torch.Tensor
    divergence: torch.Tensor
    log_ratio: torch.Tensor
    valid: torch.Tensor


def span_reverse_kl(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                    student_span: torch.Tensor, teacher_span: torch.Tensor, num_spans: int,
                    loss_mask: torch.Tensor | None = None, temperature: float = 1.0,
                    vocab_size: int | None = None, tp_group=None, chunk_size: int | None = None) -> SpanSignal:
    """The sampled reverse KL between two tokenizations of one text, span by span, as a policy gradient.

    Args:
        student_logits: this rank's vocab shard ``[L, V_local]`` of the student's packed rows.
        targets: ``[L]`` the student token each row predicts.
        teacher_logprobs: ``[L_t]`` the teacher's log-prob of the token each of *its* packed rows
            predicts (its own tokenization, packed separately), taken as constants.
        student_span, teacher_span: ``[L]`` / ``[L_t]`` the aligned span of each row's predicted
            token (``-1``: none), numbered ``0 .. num_spans - 1`` over the pack.
        loss_mask: ``[L]``; a span with a student token outside it (prompt, tool output) is dropped
            whole, since its text is not all the student's action.

    For span ``k`` with student tokens ``S_k`` and teacher tokens ``T_k`` over the same text,
    ``r_k = sum_{i in S_k} log p(y_i) - sum_{j in T_k} log q(y'_j)``: the log-ratio of the two
    models' probabilities of that text given the same preceding text, each through its own
    tokenization (the student's sampled one, the teacher's canonical one). For text sampled from
    the student, ``sum_k r_k`` is the single-sample estimate of the reverse KL over the completion.
    Every student token of span ``k`` gets the advantage ``A_k = -r_k`` (detached), and the
    per-token loss is ``-A_k log p(y_i)``, the form of ``sampled_reverse_kl`` in the training
    objective: its gradient is ``-A_k`` times the gradient of the span's log-probability, the
    policy gradient with the span as one action. With one token per side in every span (one
    tokenizer) this is the per-token objective exactly.

    Collectives: those of :func:`~megatron_opd.losses.logprobs.token_logprobs` (one all_gather of
    ``[chunk, 3]`` per chunk over ``tp_group``).
    """
    lead = tuple(student_logits.shape[:-1])
    if len(lead) != 1:
        raise ValueError(f"student_logits must be [L, V_local] (one packed row), got {tuple(student_logits.shape)}")
    for name, t, shape in (("targets", targets, lead), ("student_span", student_span, lead),
                           ("teacher_span", teacher_span, tuple(teacher_logprobs.shape))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if teacher_logprobs.dim() != 1:
        raise ValueError(f"teacher_logprobs must be [L_teacher], got {tuple(teacher_logprobs.shape)}")
    for name, span in (("student_span", student_span), ("teacher_span", teacher_span)):
        if span.numel() and (span.min() < -1 or span.max() >= num_spans):
            raise ValueError(f"{name} must lie in [-1, num_spans={num_spans}), got "
                             f"[{span.min().item()}, {span.max().item()}]")
    in_span = student_span >= 0
    mask = flat_mask(loss_mask, lead, what="student_logits")
    ids = torch.where(in_span, targets, 0)
    logp = token_logprobs(student_logits, ids, vocab_size=vocab_size, tp_group=tp_group,
                          temperature=temperature, chunk_size=chunk_size)
    dtype = logp.dtype
    s_idx, t_idx = student_span.clamp_min(0), teacher_span.clamp_min(0)
    zeros = logp.new_zeros(num_spans)
    span_s = zeros.index_add(0, s_idx, torch.where(in_span, logp.detach(), 0.0))
    span_t = zeros.index_add(0, t_idx, torch.where(teacher_span >= 0, teacher_logprobs.detach().to(dtype), 0.0))
    count = zeros.index_add(0, s_idx, in_span.to(dtype))
    valid = (count > 0) & (zeros.index_add(0, t_idx, (teacher_span >= 0).to(dtype)) > 0)
    if mask is not None:
        untrained = zeros.index_add(0, s_idx, (in_span & ~mask).to(dtype))
        valid &= untrained == 0
    log_ratio = torch.where(valid, span_s - span_t, 0.0)
    row = in_span & valid[s_idx]
    advantage = torch.where(row, -log_ratio[s_idx], 0.0)
    loss = torch.where(row, -advantage * logp, 0.0)
    divergence = torch.where(row, log_ratio[s_idx] / count[s_idx].clamp_min(1), 0.0)
    return SpanSignal(loss, advantage, divergence, log_ratio, valid)


# --- the divergence over the shared vocabulary --------------------------------------------------


@dataclass(frozen=True)
class _Side:
    vocab_size: int
    tp: int
    width: int

    def owner(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.width


class SharedVocab:
    """The tokens both vocabularies share (``student_ids[k]`` and ``teacher_ids[k]`` spell the same,
    sorted by student id) placed in both models' vocab shards, and the plan that moves the
    teacher's log-probs of them from its shards to the student's.

    Student TP rank ``r`` holds pairs ``student_range(r)``, contiguous in pair order; teacher TP
    rank ``j`` holds ``teacher_pairs(j)``. ``route(j, r)`` says which of teacher rank ``j``'s
    columns student rank ``r`` needs, and where they go in its list. Widths are the models'
    columns per rank (padded vocabulary / TP)."""

    def __init__(self, student_ids, teacher_ids, *, student_vocab_size: int, student_tp: int,
                 student_width: int, teacher_vocab_size: int, teacher_tp: int, teacher_width: int):
        s_ids = np.asarray(student_ids, dtype=np.int64).reshape(-1)
        t_ids = np.asarray(teacher_ids, dtype=np.int64).reshape(-1)
        if s_ids.shape != t_ids.shape:
            raise ValueError(f"student_ids {s_ids.shape} and teacher_ids {t_ids.shape} must pair up")
        for name, ids, size, tp, width in (("student", s_ids, student_vocab_size, student_tp, student_width),
                                           ("teacher", t_ids, teacher_vocab_size, teacher_tp, teacher_width)):
            if tp * width < size:
                raise ValueError(f"{name}: tp * width = {tp} * {width} < vocab_size {size}")
            if ids.size and (ids.min() < 0 or ids.max() >= size):
                raise ValueError(f"{name} shared ids must lie in [0, {name}_vocab_size={size}), got "
                                 f"[{ids.min()}, {ids.max()}]")
            if len(np.unique(ids)) != len(ids):
                raise ValueError(f"{name} shared ids repeat: the map must be one-to-one")
        if np.any(np.diff(s_ids) < 0):
            order = np.argsort(s_ids, kind="stable")
            s_ids, t_ids = s_ids[order], t_ids[order]
        self.student_ids, self.teacher_ids = s_ids, t_ids
        self.student = _Side(student_vocab_size, student_tp, student_width)
        self.teacher = _Side(teacher_vocab_size, teacher_tp, teacher_width)
        self._s_bounds = np.searchsorted(s_ids, np.arange(student_tp + 1) * student_width)
        t_owner = self.teacher.owner(t_ids)
        self._t_pairs = [np.flatnonzero(t_owner == j) for j in range(teacher_tp)]
        # The student can put mass outside the shared tokens (else the tail bucket is dropped and the
        # teacher is renormalised over the shared tokens: the student has nothing to match its tail with).
        self.has_tail = len(s_ids) < student_vocab_size

    def __len__(self) -> int:
        return len(self.student_ids)

    def student_range(self, r: int) -> tuple[int, int]:
        return int(self._s_bounds[r]), int(self._s_bounds[r + 1])

    def student_columns(self, r: int) -> np.ndarray:
        a, b = self.student_range(r)
        return self.student_ids[a:b] - r * self.student.width

    def teacher_pairs(self, j: int) -> np.ndarray:
        return self._t_pairs[j]

    def teacher_columns(self, j: int) -> np.ndarray:
        return self.teacher_ids[self._t_pairs[j]] - j * self.teacher.width

    def route(self, j: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions in teacher rank ``j``'s list of the pairs student rank ``r`` holds, and their
        positions in ``r``'s list."""
        a, b = self.student_range(r)
        pairs = self._t_pairs[j]
        keep = (pairs >= a) & (pairs < b)
        return np.flatnonzero(keep), pairs[keep] - a


def _check_side(plan_side: _Side, shard: VocabShard, what: str) -> None:
    if (shard.world, shard.width, shard.vocab_size) != (plan_side.tp, plan_side.width, plan_side.vocab_size):
        raise ValueError(f"{what}: tp, columns per rank, vocab_size = {shard.world}, {shard.width}, "
                         f"{shard.vocab_size}, but the shared-vocabulary plan was built for {plan_side.tp}, "
                         f"{plan_side.width}, {plan_side.vocab_size}")


def _masked_lse(z_cv: torch.Tensor, drop_v: torch.Tensor | None, temperature: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's ``(max, log sum exp((z - max) / T))`` over the real columns not in ``drop_v``."""
    if drop_v is None:
        x, m = shifted_logits(z_cv, temperature, dtype)
    else:
        x = to_compute(z_cv, dtype).masked_fill_(drop_v, float("-inf"))
        m = shift_(x, temperature)
    return m, exp_and_logsumexp(x)[1]


def _shared_mask(cols: torch.Tensor, n: int, device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, cols, True)


@torch.no_grad()
def teacher_shared_logprobs(teacher_logits: torch.Tensor, plan: SharedVocab, *, tp_group=None,
                            temperature: float = 1.0, chunk_size: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's side: from its vocab shard ``[N, V_local]``, its log-probs of the shared tokens
    it holds ``[N, len(plan.teacher_pairs(rank))]`` (in pair order) and of everything it does not
    share ``[N]`` (the tail bucket; the same on every rank). Without a tail bucket
    (``plan.has_tail`` False) the log-probs are renormalised over the shared tokens.

    Collectives per chunk over ``tp_group``: one all_gather of ``[chunk, 4]`` (each rank's max and
    log-sum-exp over all its columns and over its unshared ones).
    """
    check_temperature(temperature)
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [N, V_local], got {tuple(teacher_logits.shape)}")
    shard = vocab_shard(teacher_logits.shape[-1], vocab_size=plan.teacher.vocab_size, tp_group=tp_group,
                        what="teacher_logits")
    _check_side(plan.teacher, shard, "teacher_logits")
    device = teacher_logits.device
    dtype = compute_dtype(teacher_logits.dtype)
    cols = torch.as_tensor(plan.teacher_columns(shard.rank), device=device)
    shared_v = _shared_mask(cols, shard.num_valid, device)
    n = teacher_logits.shape[0]
    out = torch.empty((n, len(cols)), dtype=dtype, device=device)
    tail = torch.empty(n, dtype=dtype, device=device)
    chunk = resolve_chunk_size(chunk_size, shard.width, device)
    for begin in range(0, n, chunk):
        z = teacher_logits[begin:begin + chunk, :shard.num_valid]
        norm = _masked_lse(z, None if plan.has_tail else ~shared_v, temperature, dtype)
        parts = gather_tokens(torch.stack([*norm, *_masked_lse(z, shared_v, temperature, dtype)], dim=-1), shard)
        big, lse = combine_logsumexp(parts[..., 0], parts[..., 1], temperature)
        big_r, lse_r = combine_logsumexp(parts[..., 2], parts[..., 3], temperature)
        out[begin:begin + chunk] = log_probs(z[:, cols], big, lse, temperature, dtype)
        tail[begin:begin + chunk] = (big_r - big) / temperature + lse_r - lse
    return out, tail


def route_shared_logprobs(teacher_part: tuple[torch.Tensor, torch.Tensor] | None, plan: SharedVocab, *,
                          teacher_ranks: list[int], student_ranks: list[int], num_rows: int,
                          dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Move the teacher's shared log-probs from its TP ranks to the student's, point to point.

    ``teacher_ranks[j]`` / ``student_ranks[r]`` are the global ranks of the teacher's and the
    student's TP groups for these rows. Teacher rank ``j`` passes its :func:`teacher_shared_logprobs`
    as ``teacher_part``; student rank ``r`` gets ``[num_rows, len(student_columns(r))]`` (its
    shared columns in order) and the tail ``[num_rows]``; other ranks get None. Each student rank
    receives only the columns of its own shard (plus the tail, from teacher rank 0)."""
    if len(teacher_ranks) != plan.teacher.tp or len(student_ranks) != plan.student.tp:
        raise ValueError(f"teacher_ranks {teacher_ranks} / student_ranks {student_ranks} must list the "
                         f"plan's teacher TP {plan.teacher.tp} / student TP {plan.student.tp} ranks")
    me = dist.get_rank()
    j = teacher_ranks.index(me) if me in teacher_ranks else None
    r = student_ranks.index(me) if me in student_ranks else None
    if j is not None and teacher_part is None:
        raise ValueError(f"rank {me} is teacher TP rank {j} and must pass its teacher_part")
    ops, local, inbox = [], {}, []
    if j is not None:
        values, tail = teacher_part
        for rr, dst in enumerate(student_ranks):
            src_pos, _ = plan.route(j, rr)
            block = values[:, torch.as_tensor(src_pos, device=values.device)].to(dtype)
            if j == 0:
                block = torch.cat([block, tail.to(dtype).unsqueeze(-1)], dim=-1)
            if dst == me:
                local[j] = block
            elif block.shape[-1]:
                ops.append(dist.P2POp(dist.isend, block.contiguous(), dst))
    out = None
    if r is not None:
        a, b = plan.student_range(r)
        out = torch.empty((num_rows, b - a + 1), dtype=dtype, device=device)  # the last column: the tail
        for jj, src in enumerate(teacher_ranks):
            _, dst_pos = plan.route(jj, r)
            width = len(dst_pos) + (jj == 0)
            if src != me and width:
                buf = torch.empty((num_rows, width), dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, src))
                inbox.append((jj, dst_pos, buf))
            elif src == me:
                inbox.append((jj, dst_pos, local[jj]))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    if out is None:
        return None
    for jj, dst_pos, buf in inbox:
        out[:, torch.as_tensor(dst_pos, device=device)] = buf[:, :len(dst_pos)]
        if jj == 0:
            out[:, -1] = buf[:, -1]
    return out[:, :-1], out[:, -1]


class SharedVocabTail:
    """The divergence between the (shared tokens + tail)-bucket coarsenings of both next-token
    distributions, on the student's vocab shard (the :class:`ChunkedLoss` of
    :func:`shared_vocab_divergence`).

    Buckets: each shared token (student id ``s_k``, teacher id ``t_k``) and one tail holding each
    side's mass on the tokens it does not share. Each rank holds the buckets of its own shared
    columns; the per-row sums of the kind's terms add up over ranks (the tail's, the same on every
    rank, is added once after the sum). Gradients w.r.t. ``s = z / T``: a shared column gets its
    bucket's ``H_b`` from the kind's formula, an unshared column ``j`` its share of the tail
    bucket, ``(p_j / P_tail) H_tail``. Tail masses are floored at the smallest normal float (the
    teacher's is empty when it shares its whole vocabulary). A student that shares its whole
    vocabulary has no tail bucket (``has_tail`` False: the teacher's log-probs come renormalised
    over the shared tokens).
    """

    def __init__(self, divergence, shard: VocabShard, cols: torch.Tensor, teacher_tk: torch.Tensor,
                 teacher_tail_t: torch.Tensor, *, has_tail: bool, temperature: float, dtype: torch.dtype):
        self.divergence, self.shard, self.temperature, self.dtype = divergence, shard, temperature, dtype
        self.cols, self.teacher_tk, self.teacher_tail_t, self.has_tail = cols, teacher_tk, teacher_tail_t, has_tail
        self.shared_v = _shared_mask(cols, shard.num_valid, cols.device)
        self.log_tiny = math.log(torch.finfo(dtype).tiny)

    def _buckets(self, z_cv, rows, big, lse, big_r, lse_r):
        logp = log_probs(z_cv[:, self.cols], big, lse, self.temperature, self.dtype)
        logp_tail = ((big_r - big) / self.temperature + lse_r - lse).clamp_min(self.log_tiny).unsqueeze(-1)
        logq = self.teacher_tk[rows].to(self.dtype, copy=True)
        logq_tail = self.teacher_tail_t[rows].to(self.dtype).clamp_min(self.log_tiny).unsqueeze(-1)
        return logp, logp_tail, logq, logq_tail

    def forward_chunk(self, z_cv: torch.Tensor, rows: slice):
        temperature = self.temperature
        # Collective 1: every rank's (max, log-sum-exp) over all and over unshared columns.
        parts = torch.stack([*_masked_lse(z_cv, None, temperature, self.dtype),
                             *_masked_lse(z_cv, self.shared_v, temperature, self.dtype)], dim=-1)
        parts = gather_tokens(parts, self.shard)
        big, lse = combine_logsumexp(parts[..., 0], parts[..., 1], temperature)
        big_r, lse_r = combine_logsumexp(parts[..., 2], parts[..., 3], temperature)
        logp, logp_tail, logq, logq_tail = self._buckets(z_cv, rows, big, lse, big_r, lse_r)
        # Collective 2: the kind's sums over the shared buckets; the tail's is added once, after.
        sums = sum_tokens(self.divergence.sums(logp, logq, logp.exp(), logq.exp()), self.shard)
        if self.has_tail:
            sums = sums + self.divergence.sums(logp_tail, logq_tail, logp_tail.exp(), logq_tail.exp())
        loss, aux = self.divergence.loss(sums)
        return loss, (big, lse, big_r, lse_r, aux)

    def grad_chunk(self, z_cv: torch.Tensor, rows: slice, state, scale_c: torch.Tensor,
                   out: torch.Tensor) -> None:
        big, lse, big_r, lse_r, aux = state
        logp, logp_tail, logq, logq_tail = self._buckets(z_cv, rows, big, lse, big_r, lse_r)
        h_shared = self.divergence.grad_(logp, logq, aux)
        if self.has_tail:
            # Unshared columns: p_j / P_tail = exp((z_j - M_r) / T - L_r); 0 when they have no mass.
            h_tail = self.divergence.grad_(logp_tail, logq_tail, aux)
            grad = log_probs(z_cv, big_r, torch.where(lse_r > float("-inf"), lse_r, 0.0), self.temperature,
                             self.dtype)
            grad.masked_fill_(self.shared_v, float("-inf")).exp_().mul_(h_tail)
        else:
            grad = z_cv.new_zeros(z_cv.shape, dtype=self.dtype)
        grad[:, self.cols] = h_shared
        scale_into(grad, scale_c, out)


def shared_vocab_divergence(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                            teacher_tail_logprob: torch.Tensor, plan: SharedVocab, *, kind: str,
                            beta: float = 0.5, temperature: float = 1.0, loss_mask: torch.Tensor | None = None,
                            tp_group=None, chunk_size: int | None = None) -> torch.Tensor:
    """Per-row divergence over the shared vocabulary plus a tail bucket (GOLD-style), vocab-parallel.

    Args:
        student_logits: this rank's student vocab shard ``[N, V_local]`` at the rows of spans that
            are one token on both sides (``PackedAlignment.shared_student_rows``).
        teacher_logprobs: ``[N, len(plan.student_columns(rank))]`` the teacher's log-probs of the
            shared tokens whose student ids this rank holds, in id order
            (:func:`route_shared_logprobs`), taken as constants.
        teacher_tail_logprob: ``[N]`` the teacher's log-mass on its unshared tokens.
        kind, beta: as :func:`~megatron_opd.losses.divergence.vocab_parallel_divergence`;
            ``forward_kl`` is KL(teacher buckets || student buckets).
        temperature: divides the student's logits (the teacher's were tempered on its side).

    Returns ``[N]`` in fp32 (fp64 for fp64 logits), differentiable w.r.t. ``student_logits`` with
    an analytic chunked backward. Collectives per chunk over ``tp_group``: one all_gather of
    ``[chunk, 4]`` and one all_reduce of ``[chunk, 1]`` (``[chunk, 2]`` for JSD); none in the
    backward. The full logits of neither model are gathered anywhere.
    """
    divergence = make_divergence(kind, beta)
    check_temperature(temperature)
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating tensor [N, V_local], got {student_logits.dtype} "
                        f"of shape {tuple(student_logits.shape)}")
    shard = vocab_shard(student_logits.shape[-1], vocab_size=plan.student.vocab_size, tp_group=tp_group,
                        what="student_logits")
    _check_side(plan.student, shard, "student_logits")
    n = student_logits.shape[0]
    cols = plan.student_columns(shard.rank)
    if tuple(teacher_logprobs.shape) != (n, len(cols)):
        raise ValueError(f"teacher_logprobs must be [N, shared columns of this rank] = {(n, len(cols))}, got "
                         f"{tuple(teacher_logprobs.shape)}")
    if tuple(teacher_tail_logprob.shape) != (n,):
        raise ValueError(f"teacher_tail_logprob must be [N] = {(n,)}, got {tuple(teacher_tail_logprob.shape)}")
    device = student_logits.device
    loss = SharedVocabTail(divergence, shard, torch.as_tensor(cols, device=device), teacher_logprobs.detach(),
                           teacher_tail_logprob.detach(), has_tail=plan.has_tail, temperature=temperature,
                           dtype=compute_dtype(student_logits.dtype))
    mask_t = flat_mask(loss_mask, (n,), what="student_logits")
    chunk = resolve_chunk_size(chunk_size, shard.width, device)
    return ChunkedVocabLoss.apply(student_logits, loss, mask_t, chunk)
