"""Time and peak memory of one packed micro-batch's core attention (forward + backward): ours
against the dense block-causal mask.

  ours    megatron_opd.models.attention.VarlenAttention on THD q/k/v with PackedSeqParams
          (cu_seqlens): causal attention per packed sequence
  dense   megatron-core's local DotProductAttention with a [1, 1, L, L] block-causal mask
          (block_causal_mask below: the former packed path, gone from the package)

A micro-batch is ``--tokens`` tokens of sequences whose lengths are drawn uniformly from
``--min-len``..``--max-len`` (the last one cut to fill the pack exactly), fp32 q/k/v of one
layer's TP shard: ``--heads`` query heads over ``--groups`` KV groups of ``--head-dim``
channels (both methods' memory grows linearly in the number of heads). Each (method, tokens)
runs in a fresh process after a warm-up on a 16-token pack. Memory is what the forward and
backward allocate on top of their inputs (q/k/v, the output gradient, and for dense the mask),
measured two ways:

  peak tensors  the CPU allocator's peak running total of allocated bytes
                (megatron_opd.testing.memory.peak_extra_bytes; exact)
  peak RSS      the resident-set high-water mark minus the resident set before the pass (adds
                what glibc keeps or fragments)

Time is the best of ``--repeats`` passes with ``--threads`` intra-op threads. The two methods'
outputs are compared (per sequence: the sum of output x output gradient, its difference relative
to the sum of their absolute values), so the table is of two computations of the same thing.

  python benchmarks/packed_attention.py                       # the table in docs/packed_attention.md
  python benchmarks/packed_attention.py --tokens 1024 4096    # skip the 16k dense run (~10 GiB)
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_opd.testing.memory import peak_extra_bytes, rss_bytes, settle
from megatron_opd.testing.multiprocess import run_distributed

METHODS = ("ours", "dense")


def draw_lengths(num_tokens: int, low: int, high: int, seed: int) -> list[int]:
    """Sequence lengths uniform in [low, high] until ``num_tokens``; the last one fills the pack."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - num_tokens
    return lengths


def _inputs(lengths, heads, groups, head_dim, seed):
    t = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, head_dim, generator=g).requires_grad_()
    k = torch.randn(t, groups, head_dim, generator=g).requires_grad_()
    v = torch.randn(t, groups, head_dim, generator=g).requires_grad_()
    grad_out = torch.randn(t, heads * head_dim, generator=g)
    return q, k, v, grad_out


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """``[1, 1, L, L]`` bool, True where attention is blocked: causal within each packed sequence,
    nothing across sequences."""
    total = sum(lengths)
    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    allowed = (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])
    return ~allowed.view(1, 1, total, total)


def _step_fn(method: str, lengths: list[int], heads: int, groups: int, head_dim: int):
    """(step, inputs bytes, output checksums fn) for one pack."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opd.models.attention import VarlenAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                               use_cpu_initialization=True, masked_softmax_fusion=False)
    q, k, v, grad_out = _inputs(lengths, heads, groups, head_dim, seed=0)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v, grad_out))
    if method == "ours":
        module = VarlenAttention(config, 1, AttnMaskType.causal, "self")
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))

        def forward():
            return module(q, k, v, None, packed_seq_params=params)
    else:
        module = DotProductAttention(config, 1, AttnMaskType.causal, "self")
        mask = block_causal_mask(lengths)
        inputs += mask.numel() * mask.element_size()

        def forward():
            # megatron's [s, b, heads, d] with b = 1 -> [s, 1, heads * d]
            return module(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask).squeeze(1)

    def step():
        q.grad = k.grad = v.grad = None
        forward().backward(grad_out)

    def checksums():
        with torch.no_grad():
            out = forward().double()
        bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
        weighted = out * grad_out
        return [(float(weighted[a:b].sum()), float(weighted[a:b].abs().sum()))
                for a, b in zip(bounds, bounds[1:])]

    return step, inputs, checksums


def measure(method: str, num_tokens: int, args: dict) -> dict:
    """One process: peak bytes and best time of a forward + backward on one pack."""
    from megatron_opd import parallel

    torch.set_num_threads(args["threads"])
    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1), what="benchmark")
    parallel.seed(0, mp)  # megatron's attention forks the model-parallel RNG stream
    shape = (args["heads"], args["groups"], args["head_dim"])
    warm, _, _ = _step_fn(method, draw_lengths(16, 3, 9, seed=1), *shape)
    warm()
    lengths = draw_lengths(num_tokens, args["min_len"], args["max_len"], seed=args["seed"])
    step, inputs, checksums = _step_fn(method, lengths, *shape)
    base = settle()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak_rss = rss_bytes("VmHWM") - base
    peak = peak_extra_bytes(step)
    times = [first]
    for _ in range(args["repeats"] - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak": peak, "peak_rss": peak_rss, "time": min(times), "inputs": inputs,
            "num_seqs": len(lengths), "checksums": checksums()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = vars(parser.parse_args())

    mib = 1 << 20
    print(f"{args['heads']} query heads, {args['groups']} KV groups, head dim {args['head_dim']}, fp32; "
          f"sequences of {args['min_len']}-{args['max_len']} tokens; {args['threads']} thread(s)\n")
    print("| tokens | sequences | method | fwd+bwd s | peak tensors MiB | dense / ours | "
          "peak RSS MiB | inputs MiB |")
    print("|" + "---|" * 8)
    for num_tokens in args["tokens"]:
        rows = {m: run_distributed(measure, 1, m, num_tokens, args, timeout=3600)[0]
                for m in args["methods"]}
        ours = rows.get("ours")
        for method, r in rows.items():
            ratio = f"{r['peak'] / ours['peak']:.1f}x" if ours else "-"
            print(f"| {num_tokens} | {r['num_seqs']} | {method} | {r['time']:.3f} | {r['peak'] / mib:.1f} | "
                  f"{ratio} | {r['peak_rss'] / mib:.1f} | {r['inputs'] / mib:.1f} |", flush=True)
        if len(rows) == 2:
            a, b = (torch.tensor(r["checksums"], dtype=torch.float64) for r in rows.values())
            rel = ((a[:, 0] - b[:, 0]).abs() / b[:, 1]).max().item()
            verdict = "agree" if rel <= 1e-5 else "warning: DISAGREE"
            print(f"|  |  | {verdict}: per-sequence checksums within {rel:.0e} (relative) |  |  |  |  |  |")


if __name__ == "__main__":
    main()
