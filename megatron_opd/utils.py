"""Small shared helpers: rank-0 logging, progress bars, atomic file writes, JSONL files."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def free_port() -> int:
    """A free TCP port on localhost (for a rendezvous of processes on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log0(message: str) -> None:
    """Print on global rank 0 only."""
    if rank() == 0:
        print(f"[megatron-opd] {message}", file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def progress(*, total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm progress bar on rank 0 (stderr), a silent stand-in elsewhere."""
    if not enabled or rank() != 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def check_writable(path: str | Path, *, directory: bool, what: str) -> Path:
    """Refuse, before any work, an output that cannot be written (ValueError naming ``what``):
    a file where a directory is meant or the reverse, a parent path through a file, or a
    directory we may not create files in. Creates nothing."""
    path = Path(path)
    try:
        if path.exists():
            if directory and not path.is_dir():
                raise ValueError(f"{what} {path}: exists and is not a directory")
            if not directory and path.is_dir():
                raise ValueError(f"{what} {path}: is a directory (give a file name)")
            where = path if directory else path.absolute().parent
        else:
            where = path.absolute().parent
            while not where.exists():
                where = where.parent
            if not where.is_dir():
                raise ValueError(f"{what} {path}: cannot be created: {where} is a file, not a directory")
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path}: not writable ({e.strerror}: {e.filename})") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path, *, what: str = "file") -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-empty line; a missing file or a line that is not
    a JSON object is a ValueError naming the file (``what`` says which) and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} does not exist")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append((lineno, row))
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically; returns the path."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
