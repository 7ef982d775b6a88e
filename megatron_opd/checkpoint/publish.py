"""Atomic publishing of output directories: write into a temporary sibling, rename when complete.

A staging directory ``.staging-<name>-<token>`` is written while its writer holds an exclusive
lock on ``.staging-<name>-<token>.lock`` (``flock``: the kernel drops it when the writer dies,
however it dies). The next start removes the staging directories whose lock is free: those of
killed writers, never a running writer's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from megatron_opd.utils import check_writable, log0

STAGING_PREFIX = ".staging-"
_LOCK_SUFFIX = ".lock"
_OLD_SUFFIX = ".old"  # an output moved aside while its replacement is renamed into place
_STARTED = time.time()


def staging_name(name: str) -> str:
    return f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def _lock_file(staging: Path) -> Path:
    base = staging.name[: -len(_OLD_SUFFIX)] if staging.name.endswith(_OLD_SUFFIX) else staging.name
    return staging.parent / (base + _LOCK_SUFFIX)


@contextlib.contextmanager
def staging_lock(staging: Path):
    """Hold the lock that marks ``staging`` as being written (take it before creating the
    directory); on exit the lock file is removed and the lock released."""
    lock = _lock_file(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner is looking at this new file: it will remove it
            os.close(fd)
            time.sleep(0.05)
            continue
        except OSError as e:  # no flock on this filesystem: the directory is still written
            log0(f"warning: {lock}: cannot lock ({e.strerror}); if this job is killed, remove "
                 f"{staging.name} by hand")
            break
        try:  # a cleaner may have removed the file between our open and our lock: lock anew
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _remove_if_abandoned(staging: Path) -> bool | None:
    """Remove ``staging`` (a directory, or a lock file left alone) and its lock file when nobody
    holds the lock; True if removed, False if a writer holds it, None if the filesystem cannot tell."""
    lock = _lock_file(staging) if not staging.name.endswith(_LOCK_SUFFIX) else staging
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:  # no lock file: left before locks existed or already handled;
        # only what is older than this process counts as left over
        try:
            if staging.stat().st_mtime >= _STARTED:
                return False
        except FileNotFoundError:
            return False
        shutil.rmtree(staging, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return None
        if staging != lock:
            shutil.rmtree(staging, ignore_errors=True)
        if not any(p.exists() for p in (lock.with_suffix(""), Path(f"{lock.with_suffix('')}{_OLD_SUFFIX}"))):
            lock.unlink(missing_ok=True)  # while holding it: a writer re-checks its file after locking
        return True
    finally:
        os.close(fd)


def remove_stale_staging(parent: str | Path, name_prefix: str) -> list[Path]:
    """Remove ``parent/.staging-<name_prefix>*`` directories (and lock files) whose writer is
    gone; a running writer's are kept. Returns the directories removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for staging in sorted(parent.glob(f"{STAGING_PREFIX}{name_prefix}*")):
        if not (staging.is_dir() or staging.name.endswith(_LOCK_SUFFIX)):
            continue
        gone = _remove_if_abandoned(staging)
        if gone is None:
            log0(f"{staging}: left by an interrupted write? this filesystem cannot tell (no flock); "
                 "remove it by hand once no job writes there")
        elif gone and not staging.name.endswith(_LOCK_SUFFIX):
            removed.append(staging)
            log0(f"removed {staging}, left by an interrupted write")
    return removed


def check_output_dir(out: str | Path, *, force: bool) -> Path:
    """Refuse an output directory that cannot be written, or an existing non-empty one unless
    ``force``."""
    out = check_writable(out, directory=True, what="output directory")
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
    staging = out.parent / _broadcast_str(staging_name(out.name) if rank0 else None)
    with staging_lock(staging) if rank0 else contextlib.nullcontext():
        if rank0:
            remove_stale_staging(out.parent, f"{out.name}-")
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
        old = staging.parent / (staging.name + _OLD_SUFFIX)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
