"""Hugging Face safetensors checkpoints: validated reading of slices, sharded writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpoint:
    """The safetensors weights of an HF model directory (one file, or shards with an index).

    Opening validates the layout before any tensor is read: the index must name existing shards,
    and every shard must hold exactly the keys the index assigns to it. Reading a row/column
    range touches only those bytes (safetensors slices), so each rank reads just its shard.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: not a directory")
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise ValueError(f"{index}: names shard {f!r}, which does not exist in {self.path}")
        elif single.is_file():
            weight_map = None
            files = [SINGLE_FILE]
        else:
            raise ValueError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for f in files:
            handle = self._open(f)
            for key in handle.keys():
                if weight_map is not None and weight_map.get(key) != f:
                    raise ValueError(f"{self.path / f}: holds tensor {key!r}, which {INDEX_FILE} "
                                     f"{'assigns to ' + repr(weight_map[key]) if key in weight_map else 'does not list'}")
                self._file_of[key] = f
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise ValueError(f"{index}: lists {missing[0]!r} in {weight_map[missing[0]]!r}, "
                                 f"but that shard does not hold it ({len(missing)} such keys)")

    def _open(self, f: str):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(self.path / f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{self.path / f}: cannot be read as safetensors ({e})") from None
        return self._handles[f]

    def keys(self) -> set[str]:
        return set(self._file_of)

    def file_of(self, name: str) -> Path:
        return self.path / self._file_of[name]

    def _slice(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        s = self._slice(name)
        if rows is None and cols is None:
            return s[:]
        if cols is None:
            return s[rows]
        return s[rows if rows is not None else slice(None), cols]


DTYPE_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
               "F64": torch.float64}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / 1234 -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"size {text!r} is not understood (e.g. 5GB, 500MB, 1024)") from None


class ShardedSafetensorsWriter:
    """Streams named tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Shards are written as they fill; :meth:`close` renames them to transformers' naming
    (``model-00001-of-00003.safetensors``) and writes the index, or a single
    ``model.safetensors`` when one shard suffices.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        idx = len(self._shards)
        save_file(self._pending, str(self.out_dir / f"shard-{idx:05d}.tmp"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.out_dir / "shard-00000.tmp", self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i:05d}.tmp", self.out_dir / fname)
            files.append(fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files
