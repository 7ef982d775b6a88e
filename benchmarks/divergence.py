"""Time and peak memory of a vocab-parallel forward KL + backward: ours against common designs.

On logits (``--shapes TOKENSxVOCAB``, fp32 logit shards as inputs):

  (a) ours         megatron_opd.losses.vocab_parallel_divergence (chunked, analytic backward)
  (b) all-gather   gather the full-vocab logits of both models on every rank, then plain torch
                   (log_softmax + kl_div), as verl's Megatron distillation path does
  (c) LogitsKLLoss vocab-parallel but unchunked autograd, in the style of Megatron/ModelOpt's
                   LogitsKLLoss (all-reduced max and sum-exp, fp32 log-probs of both sides, kl_div)

On hidden states (``--fused-shapes TOKENSxVOCABxHIDDEN``, fp32 hidden states [tokens, hidden] of
both models and their output-layer weight shards [V_local, hidden] as inputs; gradients for the
student's hidden states, all-reduced over TP, and weight shard):

  logits+matmul    the output layers as megatron runs them (h @ W^T for both models, the hidden
                   gradient all-reduced in the backward), then (a) on the logits they produce
  fused            megatron_opd.losses.fused_linear_divergence (per-token loss; the backward
                   recomputes each chunk's logits)
  fused sum        megatron_opd.losses.fused_linear_divergence_sum (the summed loss; gradients
                   computed in the forward, no logits recomputed)

Each (method, shape, TP) runs in a fresh set of processes, after a warm-up on 8 tokens. Memory is
what one forward+backward allocates on top of the inputs, the gradients included, per rank (the
largest rank), measured two ways:

  peak tensors  the peak of the CPU allocator's own running total of allocated bytes (c10's
                caffe2_report_cpu_memory_usage accounting, which also sees frees on gloo's
                threads), read through torch.profiler memory events (exact; the ratio columns
                use it)
  peak RSS      the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
                after the inputs exist) minus the resident set at that moment; it adds what
                glibc keeps or fragments and varies by tens to hundreds of MiB between runs

Time is the best of ``--repeats`` forward+backward passes, each the slowest rank's, with
``--threads`` intra-op threads per rank for every method (default 1: on a small machine shared
with other work, OpenMP regions stall whenever a core is busy elsewhere, which punishes the
many small per-chunk ops of (a) far more than the few large ops of (b) and (c)).

  python benchmarks/divergence.py                          # the tables in docs/losses.md
  python benchmarks/divergence.py --shapes 512x32768 --fused-shapes 512x32768x64 --repeats 1
                                                           # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd.losses import (fused_linear_divergence, fused_linear_divergence_sum,
                                 vocab_parallel_divergence)
from megatron_opd.testing.memory import peak_extra_bytes, rss_bytes, settle
from megatron_opd.testing.multiprocess import run_distributed

METHODS = ("ours", "all-gather", "LogitsKLLoss")
FUSED_METHODS = ("logits+matmul", "fused", "fused sum")


# ---------------------------------------------------------------- (b) all-gather, then torch

class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards into full logits; the gradient of a rank's shard is its columns."""

    @staticmethod
    def forward(ctx, x_tv, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        out = x_tv.new_empty((world * x_tv.shape[0], x_tv.shape[-1]))
        dist.all_gather_single(out, x_tv.contiguous(), group=group)
        ctx.rank, ctx.width = rank, x_tv.shape[-1]
        return out.view(world, *x_tv.shape).permute(1, 0, 2).reshape(x_tv.shape[0], -1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


def all_gather_kl(student_tv, teacher_tv, group):
    if dist.get_world_size(group) > 1:
        student_tv = _GatherVocab.apply(student_tv, group)
        teacher_tv = _GatherVocab.apply(teacher_tv, group)
    logp = F.log_softmax(student_tv.float(), dim=-1)
    logq = F.log_softmax(teacher_tv.float(), dim=-1)
    return F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)


# ---------------------------------------------------------------- (c) LogitsKLLoss style

class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradient too (the consumers differ per rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def logits_kl_loss(student_tv, teacher_tv, group):
    teacher = teacher_tv.float()
    teacher_max = teacher.max(dim=-1).values
    dist.all_reduce(teacher_max, op=dist.ReduceOp.MAX, group=group)
    teacher = teacher - teacher_max.unsqueeze(-1)
    teacher_denom = teacher.exp().sum(dim=-1)
    dist.all_reduce(teacher_denom, group=group)
    teacher_logprob = teacher - teacher_denom.log().unsqueeze(-1)

    student = student_tv.float()
    student_max = student.detach().max(dim=-1).values
    dist.all_reduce(student_max, op=dist.ReduceOp.MAX, group=group)
    student = student - student_max.unsqueeze(-1)
    student_denom = _AllReduceSum.apply(student.exp().sum(dim=-1), group)
    student_logprob = student - student_denom.log().unsqueeze(-1)

    local = F.kl_div(student_logprob, teacher_logprob, reduction="none", log_target=True).sum(-1)
    return _AllReduceSum.apply(local, group)


# ---------------------------------------------------------------- logits+matmul: megatron's output layer

class _ReduceGradient(torch.autograd.Function):
    """Identity; the backward all-reduces the gradient (megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def logits_then_divergence(h_s, w_s, h_t, w_t, group):
    z_s = _ReduceGradient.apply(h_s, group) @ w_s.t()
    with torch.no_grad():
        z_t = h_t @ w_t.t()
    return vocab_parallel_divergence(z_s, z_t, kind="forward_kl", tp_group=group).sum()


# ---------------------------------------------------------------- measurement (in each rank)

def measure(method: str, num_tokens: int, vocab: int, repeats: int, threads: int) -> dict:
    """One rank: peak extra bytes of a forward+backward, and the best time of ``repeats``."""
    torch.set_num_threads(threads)
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    width = vocab // world
    g = torch.Generator().manual_seed(rank)
    student = (torch.randn(num_tokens, width, generator=g) * 2).requires_grad_()
    teacher = torch.randn(num_tokens, width, generator=g) * 2
    loss_fn = {
        "ours": lambda s, t: vocab_parallel_divergence(s, t, kind="forward_kl", tp_group=group),
        "all-gather": lambda s, t: all_gather_kl(s, t, group),
        "LogitsKLLoss": lambda s, t: logits_kl_loss(s, t, group),
    }[method]

    def step(s=student, t=teacher):
        s.grad = None
        loss_fn(s, t).sum().backward()

    def warm_up():
        step(student[:8].detach().clone().requires_grad_(), teacher[:8])

    peak, peak_rss, best = _run(step, warm_up, repeats)
    loss = loss_fn(student, teacher).detach()
    return {"peak": peak, "peak_rss": peak_rss, "time": best, "loss_sum": loss.sum().item(),
            "inputs": 2 * student.numel() * student.element_size()}


def _timed(fn) -> float:
    """The slowest rank's time of ``fn()``."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _run(step, warm_up, repeats: int) -> tuple[int, int, float]:
    """(peak tensors, peak RSS, best time) of ``step``, after ``warm_up`` (a few tokens, so that
    loading code pages is not counted as memory). The first pass is timed too."""
    warm_up()
    base = settle()
    first = _timed(step)
    peak_rss = rss_bytes("VmHWM") - base
    peak = peak_extra_bytes(step)
    times = [_timed(step) for _ in range(repeats)]
    return peak, peak_rss, min(times, default=first)


def measure_fused(method: str, num_tokens: int, vocab: int, hidden: int, repeats: int, threads: int) -> dict:
    """One rank: a forward KL + backward from hidden states and output-layer weight shards."""
    torch.set_num_threads(threads)
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    width = vocab // world
    g = torch.Generator().manual_seed(0)  # the hidden states are the same on every rank
    h_s, h_t = torch.randn(num_tokens, hidden, generator=g), torch.randn(num_tokens, hidden, generator=g)
    g.manual_seed(1 + rank)
    # logits of std ~2, as in the logits table
    w_s = (torch.randn(width, hidden, generator=g) * 2 / hidden ** 0.5).requires_grad_()
    w_t = torch.randn(width, hidden, generator=g) * 2 / hidden ** 0.5
    h_s.requires_grad_()
    loss_fn = {
        "logits+matmul": lambda h, w: logits_then_divergence(h, w, h_t[:h.shape[0]], w_t, group),
        "fused": lambda h, w: fused_linear_divergence(h, w, h_t[:h.shape[0]], w_t, kind="forward_kl",
                                                      tp_group=group).sum(),
        "fused sum": lambda h, w: fused_linear_divergence_sum(h, w, h_t[:h.shape[0]], w_t, kind="forward_kl",
                                                              tp_group=group)[0],
    }[method]

    def step(h=h_s):
        h.grad = w_s.grad = None
        loss_fn(h, w_s).backward()

    peak, peak_rss, best = _run(step, lambda: step(h_s[:8].detach().clone().requires_grad_()), repeats)
    loss = loss_fn(h_s.detach(), w_s.detach()).item()
    inputs = sum(t.numel() * t.element_size() for t in (h_s, h_t, w_s, w_t))
    return {"peak": peak, "peak_rss": peak_rss, "time": best, "loss_sum": loss, "inputs": inputs}


# ---------------------------------------------------------------- driver

def _check_agree(rows: dict) -> None:
    losses = [r["loss"] for r in rows.values()]
    if max(losses) - min(losses) > 1e-4 * max(abs(v) for v in losses):
        print(f"  warning: the methods disagree on the summed loss: {losses}")


def _collect(fn, tp: int, *args) -> dict:
    per_rank = run_distributed(fn, tp, *args, timeout=3600)
    return {"peak": max(r["peak"] for r in per_rank), "time": per_rank[0]["time"],
            "peak_rss": max(r["peak_rss"] for r in per_rank), "loss": per_rank[0]["loss_sum"],
            "inputs": per_rank[0]["inputs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["4096x32768", "1024x151936"],
                        help="TOKENSxVOCAB, fp32 logits (default: %(default)s)")
    parser.add_argument("--fused-shapes", nargs="*", default=["2048x151936x256", "8192x151936x256"],
                        help="TOKENSxVOCABxHIDDEN, fp32 hidden states and weights (default: %(default)s)")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--fused-methods", nargs="+", default=list(FUSED_METHODS), choices=FUSED_METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per rank, for every method (default: %(default)s)")
    args = parser.parse_args()

    mib = 1 << 20
    if args.shapes:
        print("| tokens x vocab | TP | method | fwd+bwd s | peak tensors MiB/rank | vs ours | "
              "peak RSS MiB/rank | inputs MiB/rank |")
        print("|" + "---|" * 8)
    for shape in args.shapes:
        num_tokens, vocab = (int(v) for v in shape.lower().split("x"))
        for tp in args.tp:
            if vocab % tp:
                raise SystemExit(f"vocab {vocab} is not divisible by TP {tp}")
            rows = {m: _collect(measure, tp, m, num_tokens, vocab, args.repeats, args.threads)
                    for m in args.methods}
            ours = rows.get("ours")
            for method, r in rows.items():
                ratio = f"{r['peak'] / ours['peak']:.1f}x" if ours else "-"
                print(f"| {num_tokens} x {vocab} | {tp} | {method} | {r['time']:.2f} | "
                      f"{r['peak'] / mib:.0f} | {ratio} | {r['peak_rss'] / mib:.0f} | "
                      f"{r['inputs'] / mib:.0f} |", flush=True)
            _check_agree(rows)
    if args.fused_shapes:
        print("\n| tokens x vocab x hidden | TP | method | fwd+bwd s | time vs logits | "
              "peak tensors MiB/rank | logits / this | peak RSS MiB/rank | inputs MiB/rank |")
        print("|" + "---|" * 9)
    for shape in args.fused_shapes:
        num_tokens, vocab, hidden = (int(v) for v in shape.lower().split("x"))
        for tp in args.tp:
            if vocab % tp:
                raise SystemExit(f"vocab {vocab} is not divisible by TP {tp}")
            rows = {m: _collect(measure_fused, tp, m, num_tokens, vocab, hidden, args.repeats, args.threads)
                    for m in args.fused_methods}
            base = rows.get("logits+matmul")
            for method, r in rows.items():
                slower = f"{r['time'] / base['time']:.2f}x" if base else "-"
                smaller = f"{base['peak'] / r['peak']:.1f}x" if base else "-"
                print(f"| {num_tokens} x {vocab} x {hidden} | {tp} | {method} | {r['time']:.2f} | {slower} | "
                      f"{r['peak'] / mib:.0f} | {smaller} | {r['peak_rss'] / mib:.0f} | "
                      f"{r['inputs'] / mib:.0f} |", flush=True)
            _check_agree(rows)


if __name__ == "__main__":
    main()

