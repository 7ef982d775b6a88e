"""The ``megatron-opd`` command: score, convert, train (each run under torchrun for TP/PP > 1)."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per micro-batch")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-opd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _score_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            from megatron_opd import score

            return score.main(args)
    except ValueError as e:
        print(f"megatron-opd {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_opd import parallel

        parallel.shutdown_distributed()
    return 1


if __name__ == "__main__":
    sys.exit(main())
