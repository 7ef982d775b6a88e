"""Vocab-parallel, token-chunked divergences between student and teacher logits, with analytic backward."""

from __future__ import annotations

import torch

from megatron_opd.losses.kinds import make_divergence
from megatron_opd.losses.logprobs import token_logprobs
from megatron_opd.losses.topk import TopKTail
from megatron_opd.losses.vocab_parallel import (MAX_EXACT_FLOAT32_ID, ChunkedVocabLoss, LogitRows,
                                                StoredLogits, VocabShard, check_temperature,
                                                combine_logsumexp, compute_dtype, exp_and_logsumexp,
                                                gather_tokens, log_probs, realign_columns,
                                                resolve_chunk_size, scale_into, shifted_logits,
                                                sum_tokens, vocab_shard)

SUPPORTS = ("full", "teacher_topk", "student_topk")


class FullVocab:
    """The divergence over the whole (sharded) vocabulary; only per-token scalars cross ranks."""

    def __init__(self, divergence, shard: VocabShard, teacher: LogitRows, *, temperature: float,
                 dtype: torch.dtype):
        self.divergence, self.shard, self.temperature, self.dtype = divergence, shard, temperature, dtype
        self.teacher = teacher

    def _teacher(self, rows: slice) -> torch.Tensor:
        """The teacher's real logits for ``rows`` in the student's column layout."""
        return realign_columns(self.teacher(rows), self.teacher.shard, self.shard)

    def forward_chunk(self, z_cv: torch.Tensor, rows: slice):
        temperature = self.temperature
        x_s, m_s = shifted_logits(z_cv, temperature, self.dtype)
        x_t, m_t = shifted_logits(self._teacher(rows), temperature, self.dtype)
        e_s, lse_s = exp_and_logsumexp(x_s)
        e_t, lse_t = exp_and_logsumexp(x_t)
        # Collective 1: every rank's (max, log-sum-exp) of both sides, merged like split softmax.
        parts = gather_tokens(torch.stack([m_s, lse_s, m_t, lse_t], dim=-1), self.shard)
        big_s, lse_s = combine_logsumexp(parts[..., 0], parts[..., 1], temperature)
        big_t, lse_t = combine_logsumexp(parts[..., 2], parts[..., 3], temperature)
        # log p = x + (m - M) / T - L and p = exp(x) * exp(that), without another exp pass.
        to_s = ((m_s - big_s) / temperature - lse_s).unsqueeze(-1)
        to_t = ((m_t - big_t) / temperature - lse_t).unsqueeze(-1)
        logp, p = x_s.add_(to_s), e_s.mul_(to_s.exp())
        logq, q = x_t.add_(to_t), e_t.mul_(to_t.exp())
        # Collective 2: the kind's per-token sums over the vocabulary (1 value, 2 for JSD).
        sums = sum_tokens(self.divergence.sums(logp, logq, p, q), self.shard)
        loss, aux = self.divergence.loss(sums)
        return loss, (big_s, lse_s, big_t, lse_t, aux)

    def grad_chunk(self, z_cv: torch.Tensor, rows: slice, state, scale_c: torch.Tensor,
                   out: torch.Tensor) -> None:
        big_s, lse_s, big_t, lse_t, aux = state
        logp = log_probs(z_cv, big_s, lse_s, self.temperature, self.dtype)
        logq = log_probs(self._teacher(rows), big_t, lse_t, self.temperature, self.dtype)
        scale_into(self.divergence.grad_(logp, logq, aux), scale_c, out)


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    tp_group=None,
    support: str = "full",
    top_k: int | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk_tail: bool = True,
) -> torch.Tensor:
    """Per-token divergence between student and teacher next-token distributions, vocab-parallel.

    Args:
        student_logits: this rank's vocab shard ``[..., V_local]`` (rank r of ``tp_group`` holds
            global columns ``[r * V_local, (r + 1) * V_local)``), bf16/fp16/fp32 (fp64 for
            gradcheck). The result is differentiable w.r.t. it; the gradient has its dtype.
        teacher_logits: the teacher's shard ``[..., V_local_teacher]``, same leading shape. Its
            width may differ from the student's (models padded differently); the real columns are
            then moved into the student's layout with one all_to_all per chunk.
        kind: ``"forward_kl"`` = KL(p_teacher || p_student), ``"reverse_kl"`` = KL(p_student ||
            p_teacher), ``"jsd"`` = beta KL(p_teacher || m) + (1 - beta) KL(p_student || m) with
            m = beta p_teacher + (1 - beta) p_student; beta = 0 / 1 give forward / reverse KL
            (TRL's GKD convention).
        temperature: divides both logits before the softmax (teacher top-k log-probs are taken
            as given).
        loss_mask: ``[...]``, bool or 0/1; masked tokens give 0 and a zero gradient.
        vocab_size: the real vocabulary; columns at or beyond it are padding and get no mass.
            Defaults to ``tp * V_local`` of the student.
        chunk_size: tokens per chunk; default about 2**20 logits per chunk on CPU (2**24 on GPUs):
            ``max(1, elements // V_local)``. Peak extra memory is a few ``chunk_size x V_local``
            fp32 temporaries on top of the inputs and the gradient, whatever the number of tokens.
        tp_group: the tensor-parallel group the vocabulary is split over; None = unsharded.
        support: ``"full"`` (whole vocabulary), or ``"teacher_topk"`` / ``"student_topk"``: the
            divergence between the (top_k + 1)-bucket coarsenings, the top_k tokens chosen by
            teacher or student plus one bucket with each side's remaining mass (exact for
            top_k = vocab_size). Selection is vocab-parallel (local top-k, then a k-sized exchange).
        teacher_topk_ids, teacher_topk_logprobs: ``[..., K]`` global ids and the teacher's
            log-probs of them, instead of ``teacher_logits`` (needs ``support="teacher_topk"``);
            the rest bucket carries the teacher's remaining mass 1 - sum exp(logprobs).
        topk_tail: False drops the rest bucket of a top-k support: both sides are renormalized
            over the k tokens (``reverse_kl_advantage``: the k tokens keep their full log-probs
            and only they carry an advantage).
        kind ``"reverse_kl_advantage"``: the policy gradient of arXiv 2604.13016's top-k OPD,
            advantage -w_x (log p_x - log q_x) per support token x (w: the student's probability
            renormalized over the support); value sum_x w_x (log p_x - log q_x), gradient that of
            -sum_x sg(A_x) log p_x. Equal to reverse KL (value and gradient) unless
            ``topk_tail=False``.

    Returns:
        ``[...]`` per-token loss in fp32 (fp64 for fp64 inputs), identical on every TP rank.

    Collectives per chunk of tokens over ``tp_group`` (none when unsharded), the gradient is
    analytic and recomputes each chunk:

    * ``support="full"``, forward: one all_gather of ``[chunk, 4]`` (each rank's max and
      log-sum-exp of both sides), then one all_reduce (sum) of ``[chunk, 1]`` (``[chunk, 2]`` for
      JSD): the kind's summed terms. Backward: none.
    * top-k supports: see :class:`~megatron_opd.losses.topk.TopKTail` (forward: one all_gather of
      the local top-k candidates, skipped for given ids, and one all_gather of ``[chunk, k + 4]``
      partials; backward: none).
    * teacher shards wider or narrower than the student's (``support="full"``): plus one
      all_to_all of the misplaced teacher columns per chunk, in the forward and in the backward.

    The backward math per kind is in :mod:`megatron_opd.losses.kinds` and ``docs/losses.md``.
    """
    divergence = make_divergence(kind, beta)
    check_temperature(temperature)
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    lead = tuple(student_logits.shape[:-1])
    if student_logits.dim() < 1 or not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be a floating tensor [..., V_local], got "
                        f"{student_logits.dtype} of shape {tuple(student_logits.shape)}")
    shard = vocab_shard(student_logits.shape[-1], vocab_size=vocab_size, tp_group=tp_group,
                        what="student_logits")
    teacher = None
    if teacher_logits is not None:
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} != "
                             f"student_logits leading shape {lead}")
        teacher_shard = vocab_shard(teacher_logits.shape[-1], vocab_size=shard.vocab_size,
                                    tp_group=tp_group, what="teacher_logits")
        teacher = StoredLogits(teacher_logits.detach().reshape(-1, teacher_shard.width), teacher_shard)
    loss = chunked_divergence(divergence, shard, teacher, lead=lead,
                              dtype=compute_dtype(student_logits.dtype), temperature=temperature,
                              support=support, top_k=top_k,
                              teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
                              teacher_name="teacher_logits", topk_tail=topk_tail)
    mask_t = flat_mask(loss_mask, lead, what="student_logits")
    z_tv = student_logits.reshape(-1, shard.width)
    width = max(shard.width, teacher.shard.width) if teacher is not None else shard.width
    chunk = resolve_chunk_size(chunk_size, width, student_logits.device)
    out = ChunkedVocabLoss.apply(z_tv, loss, mask_t, chunk)
    return out.view(lead)


def chunked_divergence(divergence, shard: VocabShard, teacher: LogitRows | None, *,
                       lead: tuple[int, ...], dtype: torch.dtype, temperature: float, support: str,
                       top_k: int | None, teacher_topk_ids: torch.Tensor | None,
                       teacher_topk_logprobs: torch.Tensor | None, teacher_name: str,
                       topk_tail: bool = True):
    """The :class:`ChunkedLoss` of a divergence against a teacher given as logit rows or as top-k
    ids + log-probs, after checking the support arguments (``teacher_name`` names the teacher's
    tensor in errors). Shared by the logits and the fused-linear entry points."""
    given = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if given:
        if teacher is not None:
            raise ValueError(f"pass either {teacher_name} or teacher_topk_ids/teacher_topk_logprobs, "
                             "not both")
        if support != "teacher_topk":
            raise ValueError(f'teacher_topk_ids/teacher_topk_logprobs need support="teacher_topk", '
                             f"got support={support!r}")
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_ids and teacher_topk_logprobs must be given together")
        k = teacher_topk_ids.shape[-1]
        for name, t in (("teacher_topk_ids", teacher_topk_ids),
                        ("teacher_topk_logprobs", teacher_topk_logprobs)):
            if tuple(t.shape) != lead + (k,):
                raise ValueError(f"{name} must have shape {lead + (k,)} (student leading dims + [K]), "
                                 f"got {tuple(t.shape)}")
        if top_k is not None and top_k != k:
            raise ValueError(f"top_k={top_k} does not match teacher_topk_ids' last dim {k}")
        _check_top_k(k, shard.vocab_size)
        ids = teacher_topk_ids.reshape(-1, k).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= shard.vocab_size):
            raise ValueError(f"teacher_topk_ids must lie in [0, vocab_size={shard.vocab_size}), got "
                             f"[{ids.min().item()}, {ids.max().item()}]")
        return TopKTail(divergence, shard, temperature=temperature, dtype=dtype, k=k, select="given",
                        teacher_ids_tk=ids, teacher_logprobs_tk=teacher_topk_logprobs.detach().reshape(-1, k),
                        tail=topk_tail)
    if teacher is None:
        raise ValueError(f"{teacher_name} is required (or teacher_topk_ids + teacher_topk_logprobs)")
    if support == "full":
        if top_k is not None:
            raise ValueError(f'top_k={top_k} needs support="teacher_topk" or "student_topk"')
        if not topk_tail:
            raise ValueError('topk_tail=False needs support="teacher_topk" or "student_topk"')
        return FullVocab(divergence, shard, teacher, temperature=temperature, dtype=dtype)
    if top_k is None:
        raise ValueError(f"support={support!r} needs top_k")
    _check_top_k(top_k, shard.vocab_size)
    if dtype == torch.float32 and shard.vocab_size > MAX_EXACT_FLOAT32_ID:
        raise ValueError(f"top-k selection carries ids as float32: vocab_size "
                         f"{shard.vocab_size} > {MAX_EXACT_FLOAT32_ID}")
    return TopKTail(divergence, shard, temperature=temperature, dtype=dtype, k=top_k,
                    select=support.removesuffix("_topk"), teacher=teacher, tail=topk_tail)


def sampled_token_reverse_kl(
    student_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    tp_group=None,
) -> torch.Tensor:
    """Per-token ``log p_student(y) - log p_teacher(y)`` at the sampled tokens ``y``, vocab-parallel.

    For ``y ~ p_student`` this is the single-sample estimate of KL(p_student || p_teacher); the
    on-policy distillation recipe uses its negative (detached) as a per-token advantage.
    ``teacher_logprobs`` ``[...]`` are the teacher's log-probs of ``sampled_ids`` (e.g. from
    ``megatron-opd score`` or a served teacher), taken as constants. Differentiable w.r.t.
    ``student_logits`` (the gradient is that of log p_student(y)). Masked tokens give 0; their
    ids are not looked at. Collectives: those of :func:`token_logprobs`.
    """
    lead = tuple(student_logits.shape[:-1])
    if tuple(sampled_ids.shape) != lead or tuple(teacher_logprobs.shape) != lead:
        raise ValueError(f"sampled_ids {tuple(sampled_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the student's leading shape {lead}")
    mask = None if loss_mask is None else flat_mask(loss_mask, lead, what="student_logits").view(lead)
    if mask is not None:
        sampled_ids = torch.where(mask, sampled_ids, 0)
    logp = token_logprobs(student_logits, sampled_ids, vocab_size=vocab_size, tp_group=tp_group,
                          temperature=temperature, chunk_size=chunk_size)
    out = logp - teacher_logprobs.detach().to(logp.dtype)
    return out if mask is None else torch.where(mask, out, 0.0)


def _check_top_k(k: int, vocab_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"top_k must be an integer in [1, vocab_size={vocab_size}], got {k!r}")


def flat_mask(loss_mask: torch.Tensor | None, lead: tuple[int, ...], *, what: str) -> torch.Tensor | None:
    """``loss_mask`` ``[*lead]`` as a flat bool tensor (None stays None)."""
    if loss_mask is None:
        return None
    if tuple(loss_mask.shape) != lead:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != {what} leading shape {lead}")
    return loss_mask.reshape(-1) != 0
