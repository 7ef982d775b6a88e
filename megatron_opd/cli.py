"""The ``megatron-opd`` command: score, convert, train (each run under torchrun for TP/PP > 1)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def _score_parser(sub) -> None:
    p = sub.add_parser("score", help="per-token log-probs (and top-k) of token sequences",
                       description="Score JSONL token sequences with a TP/PP-sharded model. Each "
                       "input line is {\"input_ids\": [...]}; each output line is {\"logprobs\": "
                       "[...]} with logprobs[i] = log p(ids[i+1] | ids[:i+1]).")
    p.add_argument("--model", required=True, help="HF model directory (or megatron checkpoint)")
    p.add_argument("--input", required=True, help="input JSONL of {\"input_ids\": [...]}")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--top-k", type=int, default=0, help="also write the K best ids and log-probs")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixture-of-experts models)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF <-> megatron-core checkpoint conversion",
                       description="Bit-exact conversion between HF safetensors and megatron-core "
                       "dist checkpoints. Run under torchrun with --tp/--pp so each rank holds only "
                       "its slices. Outputs appear only when complete.")
    conv = p.add_subparsers(dest="direction", required=True)
    a = conv.add_parser("hf-to-mcore", help="HF model directory -> megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    b = conv.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF model directory")
    b.add_argument("--mcore", required=True, help="converted or training checkpoint directory")
    b.add_argument("--out", required=True, help="output HF model directory")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB)")
    for q in (a, b):
        q.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run")
        q.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run")
        q.add_argument("--ep", type=int, default=1,
                       help="expert-parallel size of this run (mixture-of-experts models)")
        q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="stored dtype (default: the source checkpoint's)")
        q.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="on-policy distillation (run under torchrun)",
                       description="Train a student by on-policy distillation from a teacher. "
                       "The recipe is a YAML file; any field can be overridden as section.field=value.")
    p.add_argument("--config", help="YAML recipe (may name a `base:` recipe it derives from)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 student.tp=2")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the resolved config and layouts, and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs to plan for (default: this launch)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _score_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    return parser


def _dispatch(args) -> int:
    if args.command == "score":
        from megatron_opd import score

        return score.main(args)
    if args.command == "convert":
        from megatron_opd import convert

        return convert.main(args)
    from megatron_opd.train import run

    return run.main(args)


def _fail_fast(code: int) -> None:
    """In a multi-rank job, leave now: tearing down process groups could wait on a peer that
    is gone or stuck, and torchrun stops the other ranks once this one has exited non-zero."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    from megatron_opd.cpu_compat import quiet_known_warnings

    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        # `record` writes the root-cause traceback to torchrun's error file for its summary.
        code = record(_dispatch)(args)
    except ValueError as e:
        print(f"megatron-opd {args.command}: error: {e}", file=sys.stderr)
        _fail_fast(2)
        return 2
    except BaseException as e:
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            print(f"megatron-opd {args.command}: rank {rank} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            traceback.print_exc()
            _fail_fast(1)
        raise
    from megatron_opd import parallel

    parallel.shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
