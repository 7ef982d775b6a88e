"""Fault drills for the cluster tests, injected from outside the shipped code: at a chosen step on
a chosen rank, a rank raises, its gradients turn NaN, or it is SIGKILLed mid-way through writing
a checkpoint (after the model's files, before the optimizer's), or SIGKILLed inside megatron's file
writer of a dist-checkpoint save (``kill_mid_write``: the step is the save's number, 0-based, in
this process; the rank process is killed even if the writer runs in a child). A drill fires in a
job's first attempt only, so that a torchrun restart (--max-restarts) shows the recovery.

In a process that builds the trainer itself, call :func:`inject` first. Under torchrun, run this
file as the script: it injects the drill, then runs the ``megatron-opd`` command line:

    torchrun --nproc-per-node 2 tests/fault_drills.py --fault raise --step 1 --rank 1 train ...
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_opd.checkpoint import mcore
from megatron_opd.cli import main as cli_main
from megatron_opd.train.checkpointing import step_dir_name
from megatron_opd.train.optim import NonFiniteGuard

FAULTS = ("raise", "nan", "kill_in_checkpoint", "kill_mid_write")


def _fires(rank: int) -> bool:
    return dist.get_rank() == rank and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def inject(fault: str, *, steps, rank: int) -> None:
    """Patch the trainer's update (or the checkpoint writer) of this process so that ``fault``
    happens at each of ``steps`` (0-based; a checkpoint's step: the steps done) on global rank ``rank``."""
    steps = set(steps)
    if fault == "kill_in_checkpoint":
        dist_save = mcore.dist_save

        def killing_dist_save(sharded_state_dict, directory):
            directory = Path(directory)
            saving = {step_dir_name(s) for s in steps if step_dir_name(s) in directory.parent.name}
            if directory.name == "optimizer" and saving and _fires(rank):
                os.kill(os.getpid(), signal.SIGKILL)
            return dist_save(sharded_state_dict, directory)

        mcore.dist_save = killing_dist_save
        return
    if fault == "kill_mid_write":
        _kill_mid_write(steps, rank)
        return
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    guarded_step = NonFiniteGuard.step

    def faulty_step(self, trainable, outputs, *, step: int):
        """Between the backward and the finiteness check of the update."""
        if step in steps and _fires(rank):
            if fault == "raise":
                raise RuntimeError(f"injected fault at step {step} on rank {rank}")
            next(iter(trainable.model.module.parameters())).main_grad.fill_(float("nan"))
        return guarded_step(self, trainable, outputs, step=step)

    NonFiniteGuard.step = faulty_step


def _kill_mid_write(saves: set, rank: int) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    rank_pid, count, armed = os.getpid(), [0], [False]
    dist_save, write_item = mcore.dist_save, filesystem_async._write_item

    def counting_dist_save(*args, **kwargs):
        armed[0] = count[0] in saves and _fires(rank)
        count[0] += 1
        return dist_save(*args, **kwargs)

    @functools.wraps(write_item)  # megatron reads its signature
    def killing_write_item(*args, **kwargs):
        result = write_item(*args, **kwargs)  # one item of the file is on disk, the rest is not
        if armed[0]:
            print(f"fault drill: SIGKILL rank {rank} (pid {rank_pid}) mid-write", file=sys.stderr, flush=True)
            os.kill(rank_pid, signal.SIGKILL)
        return result

    mcore.dist_save = counting_dist_save
    filesystem_async._write_item = killing_write_item


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=FAULTS, required=True)
    parser.add_argument("--step", type=int, action="append", required=True, help="repeat for several steps")
    parser.add_argument("--rank", type=int, required=True)
    args, command = parser.parse_known_args(argv)
    inject(args.fault, steps=args.step, rank=args.rank)
    return cli_main(command)


class CorruptingEngine:
    """Passes a sync through to ``engine`` with noise added to the tensor called ``name`` (a sync
    that carried wrong weights: the trainer-vs-rollout check must catch it)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def update_weights(self, named_tensors):
        import torch

        return self.engine.update_weights((n, t + 0.05 * torch.randn_like(t) if n == self.name else t)
                                          for n, t in named_tensors)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
