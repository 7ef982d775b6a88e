"""Atomic publishing of output directories: write into a temporary sibling, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist

STAGING_PREFIX = ".staging-"


def check_output_dir(out: str | Path, *, force: bool) -> Path:
    """Refuse an existing non-empty output unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: output directory exists and is not empty (pass --force to replace it)")
    return out


def _broadcast_str(value: str | None) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def staged_output(out: str | Path, *, force: bool = False):
    """Yield a temporary directory next to ``out``; on success it becomes ``out`` atomically.

    Collective when torch.distributed is initialised: every rank gets the same staging path and
    may write into it; rank 0 renames after a barrier. On any exception the staging directory is
    removed and ``out`` is left as it was.
    """
    out = check_output_dir(out, force=force)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    name = _broadcast_str(f"{STAGING_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}" if rank0 else None)
    staging = out.parent / name
    if rank0:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    if dist.is_initialized():
        dist.barrier()
    try:
        yield staging
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if rank0:
        publish_dir(staging, out)
    if dist.is_initialized():
        dist.barrier()


def publish_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f"{STAGING_PREFIX}old-{out.name}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
