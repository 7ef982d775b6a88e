"""The ``megatron-opd`` command: score, convert, train (each run under torchrun for TP/PP > 1)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from megatron_opd import parallel
from megatron_opd.commands import convert, score, train
from megatron_opd.cpu_compat import quiet_known_warnings

COMMANDS = {"score": score.main, "convert": convert.main, "train": train.main}


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
    p.add_argument("--micro-batch-tokens", type=int, default=4096,
                   help="pack sequences into micro-batches of at most this many tokens (a longer "
                   "sequence gets one of its own)")
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
    p.add_argument("--no-rehearsal", dest="rehearse", action="store_false",
                   help="with --dry-run: skip the rehearsal of the step on fake tensors (the analytic "
                        "memory estimate only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _score_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    return parser


class Stopped(BaseException):
    """SIGTERM: the launcher stops this rank (e.g. because another rank failed), or the job is cancelled."""


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def _dispatch(args) -> int:
    """Run the command; a failure that follows from a lost peer rank is reported as that."""
    try:
        return COMMANDS[args.command](args)
    except (ValueError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            raise
        lost = parallel.lost_ranks(wait_s=0 if isinstance(e, Stopped) else 2.5 * parallel.HEARTBEAT_S)
        if not lost:
            raise
        if not isinstance(e, Stopped):
            traceback.print_exc()
        print(f"megatron-opd {args.command}: rank {dist.get_rank()} stopped: lost {'; '.join(lost)} "
              f"(here it showed as {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
              file=sys.stderr, flush=True)
        if "TORCHELASTIC_RUN_ID" in os.environ and not isinstance(e, Stopped):
            # torchrun names the first rank it sees fail as the root cause: give it time to see
            # the lost one (it then stops this rank) rather than be blamed for it
            try:
                time.sleep(5)
            except Stopped:
                pass
        _fail_fast(1)
        raise


def _fail_fast(code: int) -> None:
    """In a multi-rank job, leave now: tearing down process groups could wait on a peer that
    is gone or stuck, and torchrun stops the other ranks once this one has exited non-zero."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        # `record` writes the root-cause traceback to torchrun's error file for its summary.
        code = record(_dispatch)(args)
    except ValueError as e:
        print(f"megatron-opd {args.command}: error: {e}", file=sys.stderr)
        _fail_fast(2)
        return 2
    except Stopped as e:
        print(f"megatron-opd {args.command}: rank {rank} {e}", file=sys.stderr)
        _fail_fast(128 + signal.SIGTERM)
        raise
    except BaseException as e:
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            print(f"megatron-opd {args.command}: rank {rank} failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            traceback.print_exc()
            _fail_fast(1)
        raise
    parallel.shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
