"""`megatron-opd convert`: HF <-> megatron-core conversion at the launch's TP/PP/EP (under torchrun)."""

from __future__ import annotations

from megatron_opd import parallel
from megatron_opd.checkpoint.convert import hf_to_mcore, mcore_to_hf


def main(args) -> int:
    parallel.init_distributed()
    layout = parallel.ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.hf, args.out, layout=layout, dtype=args.dtype, force=args.force)
    else:
        mcore_to_hf(args.mcore, args.out, layout=layout, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, force=args.force)
    return 0
