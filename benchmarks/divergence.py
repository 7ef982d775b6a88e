"""Time and peak memory of a vocab-parallel forward KL + backward: ours against two common designs.

  (a) ours         megatron_opd.losses.vocab_parallel_divergence (chunked, analytic backward)
  (b) all-gather   gather the full-vocab logits of both models on every rank, then plain torch
                   (log_softmax + kl_div), as verl's Megatron distillation path does
  (c) LogitsKLLoss vocab-parallel but unchunked autograd, in the style of Megatron/ModelOpt's
                   LogitsKLLoss (all-reduced max and sum-exp, fp32 log-probs of both sides, kl_div)

Each (method, shape, TP) runs in a fresh set of processes, after a warm-up on 8 tokens. Memory is
what one forward+backward allocates on top of the inputs, the gradient included, per rank (the
largest rank), measured two ways:

  peak tensors  the peak of live tensor bytes, from the allocation and free events that
                torch.profiler(profile_memory=True) records for the CPU allocator (exact; the
                ratio column uses it)
  peak RSS      the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
                after the inputs exist) minus the resident set at that moment; it adds what
                glibc keeps or fragments and varies by tens to hundreds of MiB between runs

Time is the best of ``--repeats`` forward+backward passes, each the slowest rank's, with
``--threads`` intra-op threads per rank for every method (default 1: on a small machine shared
with other work, OpenMP regions stall whenever a core is busy elsewhere, which punishes the
many small per-chunk ops of (a) far more than the few large ops of (b) and (c)).

  python benchmarks/divergence.py                          # the table in docs/losses.md
  python benchmarks/divergence.py --shapes 512x32768 --tp 1 2 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd.losses import vocab_parallel_divergence
from megatron_opd.testing.multiprocess import run_distributed

METHODS = ("ours", "all-gather", "LogitsKLLoss")


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


# ---------------------------------------------------------------- measurement (in each rank)

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _settle() -> int:
    """Free what can be freed, return it to the OS, reset the high-water mark; the RSS now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_bytes("VmRSS")


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

    def step(s, t) -> float:
        s.grad = None
        dist.barrier()
        start = time.perf_counter()
        loss_fn(s, t).sum().backward()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    # Warm up on a few tokens so that loading code pages is not counted as memory.
    step(student[:8].detach().clone().requires_grad_(), teacher[:8])
    base = _settle()
    first = step(student, teacher)
    peak_rss = _rss_bytes("VmHWM") - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        step(student, teacher)
    times = [step(student, teacher) for _ in range(repeats)]
    loss = loss_fn(student, teacher).detach()
    return {"peak": _peak_live_bytes(prof), "peak_rss": peak_rss, "time": min(times, default=first),
            "loss_sum": loss.sum().item(), "inputs": 2 * student.numel() * student.element_size()}


def _peak_live_bytes(prof) -> int:
    """Peak of (bytes allocated - bytes freed) by tensors over a profiled region, from its
    allocation events: what was live on top of whatever existed before it."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x32768", "1024x151936"],
                        help="TOKENSxVOCAB, fp32 logits (default: %(default)s)")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per rank, for every method (default: %(default)s)")
    args = parser.parse_args()

    mib = 1 << 20
    print("| tokens x vocab | TP | method | fwd+bwd s | peak tensors MiB/rank | vs ours | "
          "peak RSS MiB/rank | inputs MiB/rank |")
    print("|" + "---|" * 8)
    for shape in args.shapes:
        num_tokens, vocab = (int(v) for v in shape.lower().split("x"))
        for tp in args.tp:
            if vocab % tp:
                raise SystemExit(f"vocab {vocab} is not divisible by TP {tp}")
            rows = {}
            for method in args.methods:
                per_rank = run_distributed(measure, tp, method, num_tokens, vocab, args.repeats, args.threads,
                                           timeout=1800)
                rows[method] = {"peak": max(r["peak"] for r in per_rank), "time": per_rank[0]["time"],
                                "peak_rss": max(r["peak_rss"] for r in per_rank),
                                "loss": per_rank[0]["loss_sum"], "inputs": per_rank[0]["inputs"]}
            ours = rows.get("ours")
            for method, r in rows.items():
                ratio = f"{r['peak'] / ours['peak']:.1f}x" if ours else "-"
                print(f"| {num_tokens} x {vocab} | {tp} | {method} | {r['time']:.2f} | "
                      f"{r['peak'] / mib:.0f} | {ratio} | {r['peak_rss'] / mib:.0f} | "
                      f"{r['inputs'] / mib:.0f} |", flush=True)
            losses = [r["loss"] for r in rows.values()]
            if max(losses) - min(losses) > 1e-4 * max(abs(v) for v in losses):
                print(f"  warning: the methods disagree on the summed loss: {losses}")


if __name__ == "__main__":
    main()

