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

# Default chunk: about this many logits per chunk of tokens (128 MiB in fp32, 220 tokens of a 152k
# vocabulary). Each chunk's logits come from one matmul with the whole weight shard, which needs a
# few hundred rows to run at full speed; the loss then walks the chunk in cache-sized pieces of the
# logits version's default size (docs/losses.md).
FUSED_CHUNK_ELEMENTS = 1 << 25


class LinearLogits:
    """Rows of ``h @ W[:num_valid]^T``, one chunk of ``chunk`` rows at a time.

    Asking for rows outside the current chunk computes the chunk that starts at the aligned row
    into a reused buffer (padded rows of ``W`` are never multiplied); rows inside it are views of
    the buffer, valid until the next chunk is computed. Rows must be asked for in order.
    """

    def __init__(self, h_td: torch.Tensor, w_vd: torch.Tensor, shard: VocabShard, *, chunk: int):
        self.h_td, self.w_vd, self.shard, self.chunk = h_td, w_vd, shard, chunk
        self._buf: torch.Tensor | None = None
        self._start = self._stop = 0

    def __call__(self, rows: slice) -> torch.Tensor:
        stop = min(rows.stop, self.h_td.shape[0])
        if not self._start <= rows.start < stop <= self._stop:
            self._start = rows.start - rows.start % self.chunk
            self._stop = min(self._start + self.chunk, self.h_td.shape[0])
            if self._buf is None:
                self._buf = self.h_td.new_empty((min(self.chunk, self.h_td.shape[0]), self.shard.num_valid))
            torch.mm(self.h_td[self._start:self._stop], self.w_vd[:self.shard.num_valid].t(),
                     out=self._buf[:self._stop - self._start])
        return self._buf[rows.start - self._start:stop - self._start]

    def release(self) -> None:
        self._buf = None
        self._start = self._stop = 0


class LinearGrads:
    """``dH = dZ W`` and ``dW = dZ^T H`` of ``Z = H W[:num_valid]^T``, given ``dZ`` piece by piece.

    The loss writes ``dZ`` into :meth:`slot` views of a chunk-sized buffer (in the compute dtype);
    when a chunk is complete its two matmuls run. ``dW`` accumulates in the compute dtype, so that
    bf16/fp16 weight gradients are not rounded after every chunk; ``dH`` is one matmul per chunk
    in the input dtype.
    """

    def __init__(self, h_td: torch.Tensor, w_vd: torch.Tensor, num_valid: int, *, chunk: int,
                 dtype: torch.dtype, need_h: bool = True, need_w: bool = True):
        self.h_td, self.w_vd, self.n, self.chunk = h_td, w_vd, num_valid, chunk
        self.dz = h_td.new_empty((min(chunk, h_td.shape[0]), num_valid), dtype=dtype)
        self.dh_td = torch.empty_like(h_td, memory_format=torch.contiguous_format) if need_h else None
        self.dw_vd = w_vd.new_zeros(w_vd.shape, dtype=dtype) if need_w else None
        self._start = self._stop = 0

    def slot(self, rows: slice) -> torch.Tensor:
        start = rows.start - rows.start % self.chunk
        if start != self._start:
            self._flush()
            self._start = start
        self._stop = min(rows.stop, self.h_td.shape[0])
        return self.dz[rows.start - start:self._stop - start]

    def _flush(self) -> None:
        rows = slice(self._start, self._stop)
        dz = self.dz[:self._stop - self._start]
        if self.dh_td is not None:
            torch.mm(dz.to(self.h_td.dtype), self.w_vd[:self.n], out=self.dh_td[rows])
        if self.dw_vd is not None:
            self.dw_vd[:self.n].addmm_(dz.t(), self.h_td[rows].to(self.dz.dtype))
        self._stop = self._start

    def finish(self, shard: VocabShard | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dH, dW)``, dH summed over ``shard``'s group unless ``shard`` is None."""
        self._flush()
        if self.dh_td is not None and shard is not None:
            sum_tokens(self.dh_td, shard)
        dw = None if self.dw_vd is None else self.dw_vd.to(self.w_vd.dtype)
        self.dz = self.dw_vd = None
        return self.dh_td, dw


class FusedLinearLoss(torch.autograd.Function):
    """Run a :class:`~megatron_opd.losses.vocab_parallel.ChunkedLoss` on ``h @ W^T``, chunk by chunk.

    The forward computes each chunk's logits, hands them to the loss and keeps only per-token
    state. The backward recomputes each chunk's logits, gets the loss's analytic gradient ``dZ``
    w.r.t. them, and turns it into ``dH[chunk] = dZ @ W`` and ``dW += dZ^T @ H[chunk]``
    (:class:`LinearGrads`): nothing of size ``tokens x V`` ever exists.

    ``dH`` is this rank's vocab shard's share of the hidden-state gradient. The loss depends on
    ``h`` through every rank's shard, so the full gradient is the sum over the TP group: with
    ``reduce_hidden_grad`` the backward all-reduces it (as megatron's ``ColumnParallelLinear``
    does for its input without sequence parallelism), otherwise the caller must (e.g. with the
    reduce-scatter of a sequence-parallel gather).
    """

    @staticmethod
    def forward(ctx, h_td: torch.Tensor, w_vd: torch.Tensor, loss: ChunkedLoss, mask_t: torch.Tensor | None,
                chunks: tuple[int, int], reduce_hidden_grad: bool,
                teacher: LinearLogits | None) -> torch.Tensor:
        chunk, piece = chunks
        student = LinearLogits(h_td, w_vd, loss.shard, chunk=chunk)
        out, ctx.states = forward_chunks(loss, student, h_td.shape[0], piece, mask_t, h_td.device)
        for source in (student, teacher):
            if source is not None:
                source.release()
        ctx.save_for_backward(h_td, w_vd, mask_t)
        ctx.loss, ctx.chunk, ctx.teacher, ctx.reduce_hidden_grad = loss, chunk, teacher, reduce_hidden_grad
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t: torch.Tensor):
        h_td, w_vd, mask_t = ctx.saved_tensors
        loss = ctx.loss
        student = LinearLogits(h_td, w_vd, loss.shard, chunk=ctx.chunk)
        grads = LinearGrads(h_td, w_vd, loss.shard.num_valid, chunk=ctx.chunk, dtype=loss.dtype,
                            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        scale_t = grad_scale(grad_t, loss, mask_t)
        for rows, state in ctx.states:
            loss.grad_chunk(student(rows), rows, state, scale_t[rows], out=grads.slot(rows))
        if ctx.teacher is not None:
            ctx.teacher.release()
        dh_td, dw_vd = grads.finish(loss.shard if ctx.reduce_hidden_grad else None)
        return dh_td, dw_vd, None, None, None, None, None


class FusedLinearLossSum(torch.autograd.Function):
    """``sum_t weight_t * loss_t`` of a :class:`ChunkedLoss` on ``h @ W^T``, with the gradients
    computed in the forward: each chunk's logits (both models') are used for the value and, while
    still there, for ``dZ`` and its two matmuls, so no logits are recomputed. The backward only
    scales the kept ``dH``, ``dW`` by the incoming gradient. Also returns the per-token loss
    (not differentiable). ``dH`` is all-reduced in the forward (``reduce_hidden_grad``)."""

    @staticmethod
    def forward(ctx, h_td: torch.Tensor, w_vd: torch.Tensor, loss: ChunkedLoss, mask_t: torch.Tensor | None,
                weights_t: torch.Tensor, chunks: tuple[int, int], reduce_hidden_grad: bool,
                teacher: LinearLogits | None) -> tuple[torch.Tensor, torch.Tensor]:
        chunk, piece = chunks
        student = LinearLogits(h_td, w_vd, loss.shard, chunk=chunk)
        grads = LinearGrads(h_td, w_vd, loss.shard.num_valid, chunk=chunk, dtype=loss.dtype,
                            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        scale_t = grad_scale(weights_t, loss, mask_t)
        # Written as the pieces go (see forward_chunks on why no small per-piece tensors are kept).
        per_token = h_td.new_empty(h_td.shape[0], dtype=loss.dtype)
        for begin in range(0, h_td.shape[0], piece):
            rows = slice(begin, begin + piece)
            z_cv = student(rows)
            value_c, state = loss.forward_chunk(z_cv, rows)
            loss.grad_chunk(z_cv, rows, state, scale_t[rows], out=grads.slot(rows))
            per_token[rows] = value_c
            del z_cv, value_c, state
        for source in (student, teacher):
            if source is not None:
                source.release()
        # Kept on ctx, not saved tensors: they are outputs of this forward, not inputs.
        ctx.dh_td, ctx.dw_vd = grads.finish(loss.shard if reduce_hidden_grad else None)
        if mask_t is not None:
            per_token = torch.where(mask_t, per_token, 0.0)
        ctx.mark_non_differentiable(per_token)
        return torch.linalg.vecdot(per_token, weights_t.to(per_token.dtype)), per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor, _grad_per_token):
        # New tensors, not in-place: a second backward (retain_graph) must give the same result.
        return (None if ctx.dh_td is None else ctx.dh_td * grad.to(ctx.dh_td.dtype),
                None if ctx.dw_vd is None else ctx.dw_vd * grad.to(ctx.dw_vd.dtype),
                None, None, None, None, None, None)


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


def _chunks(chunk_size: int | None, width: int, device: torch.device) -> tuple[int, int]:
    """(tokens per chunk of logits, tokens per piece the loss works on), the first a multiple of
    the second: pieces as small as the logits version's default chunk keep its temporaries in cache."""
    if chunk_size is None:
        chunk = max(1, FUSED_CHUNK_ELEMENTS // max(width, 1))
    else:
        chunk = resolve_chunk_size(chunk_size, width, device)
    piece = min(chunk, resolve_chunk_size(None, width, device))
    return chunk - chunk % piece, piece


@dataclass
class _Fused:
    """A fused-linear loss, its inputs flattened to tokens, ready for one of the autograd functions."""

    loss: ChunkedLoss
    lead: tuple[int, ...]
    h_td: torch.Tensor
    w_vd: torch.Tensor
    mask_t: torch.Tensor | None
    chunks: tuple[int, int]
    teacher: LinearLogits | None


def _fused_divergence(student_hidden, student_lm_head_shard, teacher_hidden, teacher_lm_head_shard, *, kind,
                      beta, temperature, loss_mask, vocab_size, chunk_size, tp_group, support, top_k,
                      teacher_topk_ids, teacher_topk_logprobs, topk_tail=True) -> _Fused:
    divergence = make_divergence(kind, beta)
    check_temperature(temperature)
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    _check_linear(student_hidden, student_lm_head_shard, what="student")
    lead = tuple(student_hidden.shape[:-1])
    shard = vocab_shard(student_lm_head_shard.shape[0], vocab_size=vocab_size, tp_group=tp_group,
                        what="student_lm_head_shard")
    if (teacher_hidden is None) != (teacher_lm_head_shard is None):
        raise ValueError("teacher_hidden and teacher_lm_head_shard must be given together")
    width = shard.width
    teacher_shard = None
    if teacher_hidden is not None:
        _check_linear(teacher_hidden, teacher_lm_head_shard, what="teacher")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} != "
                             f"student_hidden leading shape {lead}")
        teacher_shard = vocab_shard(teacher_lm_head_shard.shape[0], vocab_size=shard.vocab_size,
                                    tp_group=tp_group, what="teacher_lm_head_shard")
        width = max(width, teacher_shard.width)
    chunks = _chunks(chunk_size, width, student_hidden.device)
    teacher = None
    if teacher_shard is not None:
        teacher = LinearLogits(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
                               teacher_lm_head_shard.detach(), teacher_shard, chunk=chunks[0])
    loss = chunked_divergence(divergence, shard, teacher, lead=lead,
                              dtype=compute_dtype(student_hidden.dtype), temperature=temperature,
                              support=support, top_k=top_k, teacher_topk_ids=teacher_topk_ids,
                              teacher_topk_logprobs=teacher_topk_logprobs, teacher_name="teacher_hidden",
                              topk_tail=topk_tail)
    return _Fused(loss, lead, student_hidden.reshape(-1, student_hidden.shape[-1]), student_lm_head_shard,
                  flat_mask(loss_mask, lead, what="student_hidden"), chunks, teacher)


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
    topk_tail: bool = True,
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
        kind, beta, temperature, loss_mask, vocab_size, support, top_k, topk_tail: as for the logits
            version.
        chunk_size: tokens whose logits exist at once; default about 2**25 logits
            (``2**25 // V_local`` tokens). Peak extra memory is about three ``chunk_size x
            V_local`` buffers (both models' logits and their gradient) plus the gradients,
            whatever the number of tokens.
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

    Collectives: those of the logits version, per piece of ``min(chunk_size, 2**20 // V_local)``
    tokens (the loss walks each chunk in cache-sized pieces); plus, with ``reduce_hidden_grad``
    and TP > 1, one all_reduce of the ``[tokens, d]`` hidden-state gradient at the end of the
    backward. Compute: the backward recomputes both models' logits, so 6 matmuls of ``tokens x d
    x V_local`` against 4 for an output layer followed by the logits version; when the per-token
    losses are summed with known weights, :func:`fused_linear_divergence_sum` needs 4.
    """
    f = _fused_divergence(student_hidden, student_lm_head_shard, teacher_hidden, teacher_lm_head_shard,
                          kind=kind, beta=beta, temperature=temperature, loss_mask=loss_mask,
                          vocab_size=vocab_size, chunk_size=chunk_size, tp_group=tp_group, support=support,
                          top_k=top_k, teacher_topk_ids=teacher_topk_ids,
                          teacher_topk_logprobs=teacher_topk_logprobs, topk_tail=topk_tail)
    out = FusedLinearLoss.apply(f.h_td, f.w_vd, f.loss, f.mask_t, f.chunks, reduce_hidden_grad, f.teacher)
    return out.view(f.lead)


def fused_linear_divergence_sum(
    student_hidden: torch.Tensor,
    student_lm_head_shard: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_shard: torch.Tensor | None = None,
    *,
    kind: str,
    token_weights: torch.Tensor | None = None,
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
    topk_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token_weights * D over the unmasked tokens, D)``: the weighted sum of
    :func:`fused_linear_divergence`'s per-token loss ``D`` (a differentiable scalar) and ``D``
    itself (``[...]``, 0 where masked, not differentiable).

    Arguments as for :func:`fused_linear_divergence`; ``token_weights`` ``[...]`` (default 1).
    Because the sum's gradient is known up to one scalar, this computes the gradients in the
    forward, from each chunk's logits while they exist: no logits are recomputed (4 matmuls of
    ``tokens x d x V_local``, as many as an output layer followed by the logits version), and the
    ``[tokens, d]`` and ``[V_local, d]`` gradients are held from the forward to the backward,
    which only scales them. With ``reduce_hidden_grad`` the all_reduce of the hidden-state
    gradient is issued in the forward.
    """
    f = _fused_divergence(student_hidden, student_lm_head_shard, teacher_hidden, teacher_lm_head_shard,
                          kind=kind, beta=beta, temperature=temperature, loss_mask=loss_mask,
                          vocab_size=vocab_size, chunk_size=chunk_size, tp_group=tp_group, support=support,
                          top_k=top_k, teacher_topk_ids=teacher_topk_ids,
                          teacher_topk_logprobs=teacher_topk_logprobs, topk_tail=topk_tail)
    if token_weights is None:
        weights_t = f.h_td.new_ones(f.h_td.shape[0], dtype=f.loss.dtype)
    elif tuple(token_weights.shape) != f.lead:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} != student_hidden leading "
                         f"shape {f.lead}")
    else:
        weights_t = token_weights.detach().reshape(-1).to(f.loss.dtype)
    total, per_token = FusedLinearLossSum.apply(f.h_td, f.w_vd, f.loss, f.mask_t, weights_t, f.chunks,
                                                reduce_hidden_grad, f.teacher)
    return total, per_token.view(f.lead)


def fused_linear_token_logprobs(hidden: torch.Tensor, lm_head_shard: torch.Tensor, token_ids: torch.Tensor, *,
                                vocab_size: int | None = None, tp_group=None, temperature: float = 1.0,
                                chunk_size: int | None = None, reduce_hidden_grad: bool = True
                                ) -> torch.Tensor:
    """:func:`~megatron_opd.losses.token_logprobs` of the logits ``hidden @ lm_head_shard^T``,
    chunk by chunk; differentiable w.r.t. both (arguments as for :func:`fused_linear_divergence`).

    Collectives: those of ``token_logprobs`` per piece in the forward, and the all_reduce of the
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
    chunks = _chunks(chunk_size, shard.width, hidden.device)
    out = FusedLinearLoss.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head_shard, loss, None, chunks,
                                reduce_hidden_grad, None)
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
    chunk, _ = _chunks(chunk_size, lm_head_shard.shape[0], hidden.device)
    ids, lps = [], []
    for begin in range(0, max(h_td.shape[0], 1), chunk):
        z_cv = h_td[begin:begin + chunk] @ lm_head_shard.t()
        top_ids, top_lps = topk_logprobs(z_cv, k, vocab_size=vocab_size, tp_group=tp_group,
                                         temperature=temperature)
        ids.append(top_ids)
        lps.append(top_lps)
    return torch.cat(ids).view(lead + (k,)), torch.cat(lps).view(lead + (k,))
