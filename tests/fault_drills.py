"""Fault drills for the cluster tests, injected from outside the shipped code: at a chosen step on
a chosen rank, a rank raises, its gradients turn NaN, or it is SIGKILLed mid-way through writing
a checkpoint (after the model's files, before the optimizer's). A drill fires in a job's first
attempt only, so that a torchrun restart (--max-restarts) shows the recovery.

In a process that builds the trainer itself, call :func:`inject` first. Under torchrun, run this
file as the script: it injects the drill, then runs the ``megatron-opd`` command line:

    torchrun --nproc-per-node 2 tests/fault_drills.py --fault raise --step 1 --rank 1 train ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_opd.checkpoint import mcore
from megatron_opd.cli import main as cli_main
from megatron_opd.train.checkpointing import step_dir_name
from megatron_opd.train.loop import Trainer

FAULTS = ("raise", "nan", "kill_in_checkpoint")


def _fires(rank: int) -> bool:
    return dist.get_rank() == rank and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def inject(fault: str, *, step: int, rank: int) -> None:
    """Patch the trainer (or the checkpoint writer) of this process so that ``fault`` happens at
    ``step`` on global rank ``rank``."""
    if fault == "kill_in_checkpoint":
        dist_save = mcore.dist_save

        def killing_dist_save(sharded_state_dict, directory):
            directory = Path(directory)
            if directory.name == "optimizer" and step_dir_name(step) in directory.parent.name and _fires(rank):
                os.kill(os.getpid(), signal.SIGKILL)
            return dist_save(sharded_state_dict, directory)

        mcore.dist_save = killing_dist_save
        return
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    forward_backward = Trainer._forward_backward

    def faulty_forward_backward(self, at_step, micro_batches, signals):
        outputs = forward_backward(self, at_step, micro_batches, signals)
        if at_step == step and _fires(rank):
            if fault == "raise":
                raise RuntimeError(f"injected fault at step {step} on rank {rank}")
            next(iter(self.student.module.parameters())).main_grad.fill_(float("nan"))
        return outputs

    Trainer._forward_backward = faulty_forward_backward


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=FAULTS, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    args, command = parser.parse_known_args(argv)
    inject(args.fault, step=args.step, rank=args.rank)
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
