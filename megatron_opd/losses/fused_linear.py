"""The vocab-parallel losses fused with the output layer: logits exist one chunk of tokens at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.losses.divergence import SUPPORTS, chunked_divergence, flat_mask
from megatron_opd.losses.kinds import make_divergence
from megatron_opd.losses.logprobs import TokenLogProb, topk_logprobs
from megatron_opd.losses.vocab_parallel import (ChunkedLoss, VocabShard, check_temperature, compute_dtype,
                                                forward_chunks, grad_scale, resolve_chunk_size, sum_tokens,
                                                vocab_shard)

# Default chunk: about this many logits per chunk. Larger than the logits path's 2^20 on CPU: each
# chunk multiplies its hidden states by the whole weight shard, and a matmul with few rows reads
# the weight once per handful of tokens (measured in docs/losses.md).
FUSED_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LinearLogits:
    """Rows of ``h @ W[:num_valid]^T``, computed on demand; padded rows of ``W`` are never used."""

    h_td: torch.Tensor
    w_vd: torch.Tensor
    shard: VocabShard

    def __call__(self, rows: slice) -> torch.Tensor:
        return self.h_td[rows] @ self.w_vd[:self.shard.num_valid].t()


class FusedLinearLoss(torch.autograd.Function):
    """Run a :class:`~megatron_opd.losses.vocab_parallel.ChunkedLoss` on ``h @ W^T`` chunk by chunk.

    The forward computes each chunk's logits, hands them to the loss and keeps only per-token
    state. The backward recomputes each chunk's logits, gets the loss's analytic gradient ``dZ``
    w.r.t. them (``[chunk, V_local]``), and turns it into ``dH[chunk] = dZ @ W`` and
    ``dW += dZ^T @ H[chunk]``: nothing of size ``tokens x V`` ever exists.

    ``dH`` is this rank's vocab shard's share of the hidden-state gradient. The loss depends on
    ``h`` through every rank's shard, so the full gradient is the sum over the TP group: with
    ``reduce_hidden_grad`` the backward all-reduces it (as megatron's ``ColumnParallelLinear``
    does for its input without sequence parallelism), otherwise the caller must (e.g. with the
    reduce-scatter of a sequence-parallel gather).
    """

    @staticmethod
    def forward(ctx, h_td: torch.Tensor, w_vd: torch.Tensor, loss: ChunkedLoss, mask_t: torch.Tensor | None,
                chunk_size: int, reduce_hidden_grad: bool) -> torch.Tensor:
        student = LinearLogits(h_td, w_vd, loss.shard)
        out, ctx.states = forward_chunks(loss, student, h_td.shape[0], chunk_size, mask_t, h_td.device)
        ctx.save_for_backward(h_td, w_vd, mask_t)
        ctx.loss, ctx.chunk_size, ctx.reduce_hidden_grad = loss, chunk_size, reduce_hidden_grad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t: torch.Tensor):
        h_td, w_vd, mask_t = ctx.saved_tensors
        loss = ctx.loss
        need_h, need_w = ctx.needs_input_grad[:2]
        student = LinearLogits(h_td, w_vd, loss.shard)
        n = loss.shard.num_valid
        w_real = w_vd[:n]
        scale_t = grad_scale(grad_t, loss, mask_t)
        # dZ and the weight gradient in the compute dtype: for bf16/fp16 weights the sum over
        # chunks is not rounded after every chunk. dH is one matmul per chunk, in the input dtype.
        acc = loss.dtype
        dz_buf = h_td.new_empty((min(ctx.chunk_size, h_td.shape[0]), n), dtype=acc)
        dh_td = torch.empty_like(h_td, memory_format=torch.contiguous_format) if need_h else None
        dw_vd = w_vd.new_zeros(w_vd.shape, dtype=acc) if need_w else None
        for rows, state in ctx.states:
            z_cv = student(rows)
            dz_cv = dz_buf[:z_cv.shape[0]]
            loss.grad_chunk(z_cv, rows, state, scale_t[rows], out=dz_cv)
            del z_cv
            if need_h:
                torch.mm(dz_cv.to(h_td.dtype), w_real, out=dh_td[rows])
            if need_w:
                dw_vd[:n].addmm_(dz_cv.t(), h_td[rows].to(acc))
        if need_h and ctx.reduce_hidden_grad:
            sum_tokens(dh_td, loss.shard)
        if need_w:
            dw_vd = dw_vd.to(w_vd.dtype)
        return dh_td, dw_vd, None, None, None, None


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, *, what: str) -> None:
    """``hidden`` ``[..., d]`` and ``weight`` ``[V_local, d]`` of one floating dtype and device."""
    h_name, w_name = f"{what}_hidden", f"{what}_lm_head_shard"
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise TypeError(f"{h_name} must be a floating tensor [..., hidden], got {hidden.dtype} of shape "
                        f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w_name} must be [V_local, hidden={hidden.shape[-1]}] (megatron's output-layer "
                         f"weight shard), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"{h_name} and {w_name} must share dtype and device, got {hidden.dtype} on "
                        f"{hidden.device} and {weight.dtype} on {weight.device}")


def _chunk_size(chunk_size: int | None, width: int, device: torch.device) -> int:
    if chunk_size is None:
        return max(1, FUSED_CHUNK_ELEMENTS // max(width, 1))
    return resolve_chunk_size(chunk_size, width, device)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_lm_head_shard: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_shard: torch.Tensor | None = None,
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
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """:func:`~megatron_opd.losses.vocab_parallel_divergence` of the logits ``hidden @ W_shard^T``
    of both models, without ever holding more than one chunk of them.

    Args:
        student_hidden: ``[..., d]`` the student's final hidden states (after the final norm: the
            output layer's input), the same on every TP rank.
        student_lm_head_shard: ``[V_local, d]`` this rank's rows of the student's output-layer
            weight (megatron's ``ColumnParallelLinear`` shard; the word embeddings when tied).
            Rank r holds vocabulary rows ``[r * V_local, (r + 1) * V_local)``; rows at or beyond
            ``vocab_size`` are padding, never multiplied and given a zero gradient.
        teacher_hidden, teacher_lm_head_shard: the same for the teacher (its own hidden size and
            padding), taken as constants; or None with ``teacher_topk_ids`` +
            ``teacher_topk_logprobs`` ``[..., K]``.
        kind, beta, temperature, loss_mask, vocab_size, support, top_k: as for the logits version.
        chunk_size: tokens per chunk; default about 2**24 logits (``2**24 // V_local`` tokens).
            Peak extra memory is a few ``chunk_size x V_local`` fp32 temporaries, plus the
            gradients, whatever the number of tokens.
        tp_group: the tensor-parallel group the vocabulary is split over; None = unsharded.
        reduce_hidden_grad: True (default): the hidden-state gradient is all-reduced over
            ``tp_group`` in the backward, so every rank gets the full gradient of the loss, what
            megatron's output layer gives its input without sequence parallelism. False: each rank
            gets only its vocab shard's share, for a caller that reduces it itself (a
            reduce-scatter to sequence-parallel shards).

    Returns:
        ``[...]`` per-token loss in fp32 (fp64 for fp64 inputs), identical on every TP rank,
        differentiable w.r.t. ``student_hidden`` and ``student_lm_head_shard`` (gradients in their
        dtype; the weight's accumulated over chunks in fp32).

    Collectives: those of the logits version per chunk in the forward (the backward recomputes
    each chunk's logits locally and issues none per chunk), plus with ``reduce_hidden_grad`` and
    TP > 1 one all_reduce of the ``[tokens, d]`` hidden-state gradient at the end of the backward.
    Compute: the forward multiplies both models' hidden states by their weight shards once, the
    backward recomputes both and adds the two gradient matmuls: 6 matmuls of ``tokens x d x
    V_local`` against 4 for an output layer followed by the logits version.
    """
    divergence = make_divergence(kind, beta)
    check_temperature(temperature)
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    _check_linear(student_hidden, student_lm_head_shard, what="student")
    lead = tuple(student_hidden.shape[:-1])
    shard = vocab_shard(student_lm_head_shard.shape[0], vocab_size=vocab_size, tp_group=tp_group,
                        what="student_lm_head_shard")
    teacher = None
    if (teacher_hidden is None) != (teacher_lm_head_shard is None):
        raise ValueError("teacher_hidden and teacher_lm_head_shard must be given together")
    if teacher_hidden is not None:
        _check_linear(teacher_hidden, teacher_lm_head_shard, what="teacher")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} != "
                             f"student_hidden leading shape {lead}")
        teacher_shard = vocab_shard(teacher_lm_head_shard.shape[0], vocab_size=shard.vocab_size,
                                    tp_group=tp_group, what="teacher_lm_head_shard")
        teacher = LinearLogits(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
                               teacher_lm_head_shard.detach(), teacher_shard)
    loss = chunked_divergence(divergence, shard, teacher, lead=lead,
                              dtype=compute_dtype(student_hidden.dtype), temperature=temperature,
                              support=support, top_k=top_k, teacher_topk_ids=teacher_topk_ids,
                              teacher_topk_logprobs=teacher_topk_logprobs, teacher_name="teacher_hidden")
    mask_t = flat_mask(loss_mask, lead, what="student_hidden")
    width = max(shard.width, teacher.shard.width) if teacher is not None else shard.width
    chunk = _chunk_size(chunk_size, width, student_hidden.device)
    h_td = student_hidden.reshape(-1, student_hidden.shape[-1])
    out = FusedLinearLoss.apply(h_td, student_lm_head_shard, loss, mask_t, chunk, reduce_hidden_grad)
    return out.view(lead)


def fused_linear_token_logprobs(hidden: torch.Tensor, lm_head_shard: torch.Tensor, token_ids: torch.Tensor, *,
                                vocab_size: int | None = None, tp_group=None, temperature: float = 1.0,
                                chunk_size: int | None = None, reduce_hidden_grad: bool = True
                                ) -> torch.Tensor:
    """:func:`~megatron_opd.losses.token_logprobs` of the logits ``hidden @ lm_head_shard^T``,
    chunk by chunk; differentiable w.r.t. both (arguments as for :func:`fused_linear_divergence`).

    Collectives: those of ``token_logprobs`` per chunk in the forward, and the all_reduce of the
    hidden-state gradient in the backward (``reduce_hidden_grad``, TP > 1).
    """
    check_temperature(temperature)
    _check_linear(hidden, lm_head_shard, what="student")
    lead = tuple(hidden.shape[:-1])
    if tuple(token_ids.shape) != lead:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} != hidden leading shape {lead}")
    shard = vocab_shard(lm_head_shard.shape[0], vocab_size=vocab_size, tp_group=tp_group,
                        what="lm_head_shard")
    ids_t = token_ids.reshape(-1).long()
    if ids_t.numel() and (ids_t.min() < 0 or ids_t.max() >= shard.vocab_size):
        raise ValueError(f"token_ids must lie in [0, vocab_size={shard.vocab_size}), got "
                         f"[{ids_t.min().item()}, {ids_t.max().item()}]")
    loss = TokenLogProb(shard, ids_t, temperature=temperature, dtype=compute_dtype(hidden.dtype))
    chunk = _chunk_size(chunk_size, shard.width, hidden.device)
    out = FusedLinearLoss.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_shard, loss, None, chunk,
                                reduce_hidden_grad)
    return out.view(lead)


@torch.no_grad()
def fused_linear_topk_logprobs(hidden: torch.Tensor, lm_head_shard: torch.Tensor, k: int, *,
                               vocab_size: int | None = None, tp_group=None, temperature: float = 1.0,
                               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_opd.losses.topk_logprobs` of the logits ``hidden @ lm_head_shard^T``,
    chunk by chunk (no gradient). Collectives: those of ``topk_logprobs``."""
    _check_linear(hidden, lm_head_shard, what="student")
    lead = tuple(hidden.shape[:-1])
    h_td = hidden.reshape(-1, hidden.shape[-1])
    chunk = _chunk_size(chunk_size, lm_head_shard.shape[0], hidden.device)
    ids, lps = [], []
    for begin in range(0, max(h_td.shape[0], 1), chunk):
        z_cv = h_td[begin:begin + chunk] @ lm_head_shard.t()
        top_ids, top_lps = topk_logprobs(z_cv, k, vocab_size=vocab_size, tp_group=tp_group,
                                         temperature=temperature)
        ids.append(top_ids)
        lps.append(top_lps)
    return torch.cat(ids).view(lead + (k,)), torch.cat(lps).view(lead + (k,))
