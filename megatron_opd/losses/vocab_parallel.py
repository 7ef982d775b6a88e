"""Vocab-parallel building blocks: shard geometry, per-token exchanges, the chunked analytic driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

# Default chunk: about this many logits per chunk, whatever the vocabulary. On CPU 1M (4 MiB per fp32
# temporary) keeps the temporaries in cache and measured fastest (docs/losses.md); on GPUs, where
# every chunk costs ~40 kernel launches, 16M (64 MiB) is a guess that has not been measured.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
CHUNK_ELEMENTS_ACCELERATOR = 1 << 24
# Top-k ids travel in the same float tensor as the values; float32 holds integers exactly below this.
MAX_EXACT_FLOAT32_ID = 1 << 24
# Stands in for log 0 (a -inf logit): p = exp(LOG_ZERO) is exactly 0, and the terms p * (log p - log q)
# stay 0 * finite instead of NaN. Far below any real log-prob, with room for sums and logaddexp.
LOG_ZERO = -1e30


@dataclass(frozen=True)
class VocabShard:
    """Where one rank's logits shard sits in the vocabulary (the megatron convention).

    Rank ``r`` of the TP group holds global columns ``[r * width, (r + 1) * width)``; columns at or
    beyond ``vocab_size`` are padding, so the real ones are the first ``num_valid`` of the shard.
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int
    width: int
    vocab_size: int

    @property
    def start(self) -> int:
        return self.rank * self.width

    @property
    def num_valid(self) -> int:
        return self.valid_count(self.rank)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def valid_count(self, rank: int) -> int:
        return max(0, min(self.width, self.vocab_size - rank * self.width))

    def valid_range(self, rank: int) -> tuple[int, int]:
        return rank * self.width, rank * self.width + self.valid_count(rank)


def vocab_shard(width: int, *, vocab_size: int | None, tp_group, what: str) -> VocabShard:
    """The shard geometry of ``width`` columns per rank (``what`` names them in errors), checking
    ``vocab_size`` against it."""
    if tp_group is None:
        rank, world = 0, 1
    else:
        rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    total = world * width
    if vocab_size is None:
        vocab_size = total
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > total:
        raise ValueError(f"vocab_size {vocab_size} exceeds the columns of {what}: "
                         f"tp * V_local = {world} * {width} = {total}")
    return VocabShard(tp_group if world > 1 else None, rank, world, width, vocab_size)


class LogitRows(Protocol):
    """A model's real logit columns (the first ``shard.num_valid`` of its shard) for a slice of
    token rows: read from stored logits, or computed on demand from hidden states."""

    shard: VocabShard

    def __call__(self, rows: slice) -> torch.Tensor: ...


@dataclass(frozen=True)
class StoredLogits:
    """Rows of given ``[tokens, V_local]`` logits (views, no copies)."""

    z_tv: torch.Tensor
    shard: VocabShard

    def __call__(self, rows: slice) -> torch.Tensor:
        return self.z_tv[rows, :self.shard.num_valid]


def resolve_chunk_size(chunk_size: int | None, width: int, device: torch.device) -> int:
    if chunk_size is None:
        elements = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_ACCELERATOR)
        return max(1, elements // max(width, 1))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (so gradcheck can run in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def to_compute(z_cv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous ``dtype`` copy of a logits chunk (the inputs are never modified)."""
    return z_cv.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _row_max(z_cv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row max in ``dtype``; 0 for rows without a finite logit (an empty shard, all -inf)."""
    if z_cv.shape[-1] == 0:
        return z_cv.new_zeros(z_cv.shape[:-1], dtype=dtype)
    m = z_cv.amax(dim=-1).to(dtype)
    return torch.where(m.isfinite(), m, 0.0)


def _finish_shift_(x_cv: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature != 1.0:
        x_cv.div_(temperature)
    return x_cv.clamp_min_(LOG_ZERO)


def shifted_logits(z_cv: torch.Tensor, temperature: float, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z - max z) / T`` as a fresh ``dtype`` tensor, and the row max it subtracted.

    Subtracting the max from the raw logits before dividing keeps the differences exact at low
    temperature and large logits. -inf logits become :data:`LOG_ZERO`.
    """
    m = _row_max(z_cv, dtype)
    x = torch.sub(z_cv, m.unsqueeze(-1))  # type promotion: a fresh tensor in the compute dtype
    assert x.dtype == dtype, (x.dtype, dtype)
    return _finish_shift_(x, temperature), m


def shift_(x_cv: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`shifted_logits` in place on an own copy; returns the row max."""
    m = _row_max(x_cv, x_cv.dtype)
    _finish_shift_(x_cv.sub_(m.unsqueeze(-1)), temperature)
    return m


def exp_and_logsumexp(x_cv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(x)`` and ``log sum exp(x)`` of shifted logits (max 0, so no overflow); -inf if empty."""
    e = x_cv.exp()
    return e, e.sum(dim=-1).log()


def scale_into(grad_cv: torch.Tensor, scale_c: torch.Tensor, out: torch.Tensor) -> None:
    """``out <- grad * scale`` per row, casting to ``out``'s dtype in the same pass. Rows with
    scale 0 (masked tokens) get exactly 0, even where their loss gradient is not finite (a masked
    row of NaN logits, or a teacher row with no mass): 0 * NaN would be NaN."""
    torch.mul(grad_cv, scale_c.unsqueeze(-1), out=out)
    out.masked_fill_((scale_c == 0).unsqueeze(-1), 0.0)


def combine_logsumexp(max_pc: torch.Tensor, lse_pc: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank ``(max m_r, log sum exp((z - m_r) / T))`` into the global ``(M, L)``.

    ``M`` is the largest raw logit, ``L = log sum exp((z - M) / T)`` over every rank, so that
    ``log p = (z - M) / T - L``. Ranks with no mass (``lse = -inf``) do not set ``M``; with no
    mass anywhere (every logit -inf) the result is ``(0, -inf)``.
    """
    big = torch.where(lse_pc > float("-inf"), max_pc, float("-inf")).amax(dim=0)
    big = torch.where(big.isfinite(), big, 0.0)
    return big, torch.logsumexp((max_pc - big) / temperature + lse_pc, dim=0)


def log_probs(z_cv: torch.Tensor, big_c: torch.Tensor, lse_c: torch.Tensor, temperature: float,
              dtype: torch.dtype) -> torch.Tensor:
    """``(z - M) / T - L`` as a fresh ``dtype`` tensor (the inverse of :func:`combine_logsumexp`)."""
    x = torch.sub(z_cv, (big_c + lse_c * temperature).unsqueeze(-1))
    assert x.dtype == dtype, (x.dtype, dtype)
    return _finish_shift_(x, temperature)


def gather_tokens(x_cf: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """All-gather per-token values over the TP group: ``[c, f]`` -> ``[tp, c, f]``."""
    if not shard.sharded:
        return x_cf.unsqueeze(0)
    x_cf = x_cf.contiguous()
    out = x_cf.new_empty((shard.world * x_cf.shape[0],) + tuple(x_cf.shape[1:]))
    dist.all_gather_single(out, x_cf, group=shard.group)
    return out.view((shard.world,) + tuple(x_cf.shape))


def sum_tokens(x_cf: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """All-reduce (sum) per-token values over the TP group, in place."""
    if shard.sharded:
        dist.all_reduce(x_cf, group=shard.group)
    return x_cf


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


def realign_columns(x_cv: torch.Tensor, src: VocabShard, dst: VocabShard) -> torch.Tensor:
    """This rank's real columns in ``dst``'s layout, from real columns held in ``src``'s layout.

    Needed when two models over one vocabulary are padded to different shard widths (the
    teacher's rank r then holds other columns than the student's rank r): one ``all_to_all``
    moves each overlap to its owner. ``x_cv`` is ``[c, src.num_valid]``; returns ``[c, dst.num_valid]``.
    """
    if src.width == dst.width or not src.sharded:
        return x_cv
    me = src.rank
    send = [_overlap(src.valid_range(me), dst.valid_range(r)) for r in range(src.world)]
    recv = [_overlap(src.valid_range(r), dst.valid_range(me)) for r in range(src.world)]
    # all_to_all splits dim 0, so columns travel as rows of the transpose.
    inp = x_cv.t().contiguous()
    out = inp.new_empty((sum(recv), x_cv.shape[0]))
    dist.all_to_all_single(out, inp, recv, send, group=src.group)
    return out.t()


def local_topk(z_cv: torch.Tensor, shard: VocabShard, k: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's ``min(k, width)`` best real columns as ``[c, k_local, 2]`` (value, global id).

    Every rank sends the same ``k_local`` so the exchange has one shape; shards with fewer real
    columns pad with ``-inf`` values (id -1).
    """
    k_local = min(k, shard.width)
    out = z_cv.new_empty((z_cv.shape[0], k_local, 2), dtype=dtype)
    out[..., 0] = float("-inf")
    out[..., 1] = -1
    n = min(k_local, z_cv.shape[-1])
    if n:
        vals, idx = z_cv.topk(n, dim=-1)
        out[:, :n, 0] = vals
        out[:, :n, 1] = idx + shard.start
    return out


def select_topk(z_cv: torch.Tensor, shard: VocabShard, k: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-``k`` of sharded raw logits: ``(global ids [c, k], values [c, k] in dtype)``, best first.

    Collective: one all_gather of the local top-k candidates (values and ids), ``tp * k`` per token.
    """
    cand = local_topk(z_cv, shard, k, dtype)
    if shard.sharded:
        cand = gather_tokens(cand, shard).permute(1, 0, 2, 3).flatten(1, 2)
    vals, pos = cand[..., 0].topk(k, dim=-1)
    return cand[..., 1].gather(-1, pos).long(), vals


def local_columns(ids_ck: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Column in this shard of each global id, or ``num_valid`` (one past the end) for ids held elsewhere.

    The extra index lets scatters and gathers run without a data-dependent (synchronising) filter.
    """
    n = shard.num_valid
    local = ids_ck - shard.start
    return torch.where((local >= 0) & (local < n), local, n)


def take_columns(x_cv: torch.Tensor, cols_ck: torch.Tensor) -> torch.Tensor:
    """``x`` at the given columns, 0 where the column is ``num_valid`` (not in this shard)."""
    n = x_cv.shape[-1]
    if n == 0:
        return x_cv.new_zeros(cols_ck.shape)
    return torch.where(cols_ck < n, x_cv.gather(-1, cols_ck.clamp_max(n - 1)), 0.0)


def column_mask(cols_ck: torch.Tensor, n: int) -> torch.Tensor:
    """``[c, n]`` bool mask of the given columns (entries equal to ``n`` are ignored)."""
    mask = torch.zeros((cols_ck.shape[0], n + 1), dtype=torch.bool, device=cols_ck.device)
    return mask.scatter_(-1, cols_ck, True)[:, :n]


class ChunkedLoss(Protocol):
    """A per-token loss over the student's vocab shard, computed and differentiated chunk by chunk.

    ``forward_chunk`` gets the student's real columns for some rows and returns the per-token loss
    and whatever small per-token state the backward needs. ``grad_chunk`` writes the gradient of
    the loss w.r.t. ``z / T`` for those rows, multiplied by ``scale_c``, into ``out`` (casting to
    its dtype).
    """

    shard: VocabShard
    temperature: float
    dtype: torch.dtype  # the compute dtype: fp32, or fp64 for fp64 inputs

    def forward_chunk(self, z_cv: torch.Tensor, rows: slice) -> tuple[torch.Tensor, Any]: ...

    def grad_chunk(self, z_cv: torch.Tensor, rows: slice, state: Any, scale_c: torch.Tensor,
                   out: torch.Tensor) -> None: ...


class _TokenRows:
    """Per-chunk state written into ``[num_rows, ...]`` buffers (one per tensor of the state),
    handed back as views of them."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows
        self.buffers: list[torch.Tensor | None] | None = None

    def put(self, rows: slice, state: Any) -> tuple:
        leaves, spec = tree_flatten(state)
        if self.buffers is None:
            self.buffers = [t.new_empty((self.num_rows,) + tuple(t.shape[1:])) if isinstance(t, torch.Tensor)
                            else None for t in leaves]
        for buf, leaf in zip(self.buffers, leaves):
            if buf is not None:
                buf[rows] = leaf
        return spec, [None if buf is not None else leaf for buf, leaf in zip(self.buffers, leaves)]

    def get(self, rows: slice, kept: tuple) -> Any:
        spec, others = kept
        leaves = [other if buf is None else buf[rows] for buf, other in zip(self.buffers, others)]
        return tree_unflatten(leaves, spec)


def forward_chunks(loss: ChunkedLoss, student: LogitRows, num_rows: int, chunk_size: int,
                   mask_t: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, list]:
    """The forward of a chunked loss: per-token values ``[num_rows]`` (0 where ``mask_t`` is False)
    and the ``(rows, state)`` of every chunk for :func:`grad_scale` + ``loss.grad_chunk``.

    Values and states go into token-sized buffers as the chunks are done, not kept as small
    per-chunk tensors: on CPU, small allocations that stay alive split the holes each chunk's
    temporaries leave in glibc's heap, which then grows by about a chunk's temporaries per chunk
    (measured: 2.4 GB resident for 600 MB of live tensors, 4096 tokens of a 152k vocabulary).
    """
    out = torch.empty(num_rows, dtype=loss.dtype, device=device)
    store, kept = _TokenRows(num_rows), []
    for begin in range(0, num_rows, chunk_size):
        rows = slice(begin, begin + chunk_size)
        value_c, state = loss.forward_chunk(student(rows), rows)
        out[rows] = value_c
        kept.append((rows, store.put(rows, state)))
        del value_c, state
    if mask_t is not None:
        out = torch.where(mask_t, out, 0.0)
    return out, [(rows, store.get(rows, k)) for rows, k in kept]


def grad_scale(grad_t: torch.Tensor, loss: ChunkedLoss, mask_t: torch.Tensor | None) -> torch.Tensor:
    """Per-token factor of ``loss.grad_chunk``: the incoming gradient times d(z / T)/dz = 1 / T;
    masked tokens contribute nothing."""
    scale_t = grad_t.to(loss.dtype) / loss.temperature
    return scale_t if mask_t is None else torch.where(mask_t, scale_t, 0.0)


class ChunkedVocabLoss(torch.autograd.Function):
    """Run a :class:`ChunkedLoss` over ``[tokens, V_local]`` student logits, ``chunk_size`` rows at a time.

    No autograd graph is built over the chunks: the forward keeps per-token state only, and the
    backward recomputes each chunk and writes its analytic gradient into the gradient buffer, so
    the extra memory is a few ``chunk_size x V_local`` temporaries whatever the number of tokens.
    Masked tokens (``mask`` False) give 0 and get a zero gradient; padded columns get zero gradient.
    """

    @staticmethod
    def forward(ctx, z_tv: torch.Tensor, loss: ChunkedLoss, mask_t: torch.Tensor | None,
                chunk_size: int) -> torch.Tensor:
        out, ctx.states = forward_chunks(loss, StoredLogits(z_tv, loss.shard), z_tv.shape[0], chunk_size,
                                         mask_t, z_tv.device)
        ctx.save_for_backward(z_tv, mask_t)
        ctx.loss = loss
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t: torch.Tensor):
        z_tv, mask_t = ctx.saved_tensors
        loss = ctx.loss
        n = loss.shard.num_valid
        grad_tv = torch.empty_like(z_tv, memory_format=torch.contiguous_format)
        grad_tv[:, n:] = 0
        scale_t = grad_scale(grad_t, loss, mask_t)
        for rows, state in ctx.states:
            loss.grad_chunk(z_tv[rows, :n], rows, state, scale_t[rows], out=grad_tv[rows, :n])
        return grad_tv, None, None, None
