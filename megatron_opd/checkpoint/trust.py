"""What we unpickle from checkpoints, and the refusal of anything else before it is loaded.

Our own pickled files (the trainer's RNG states) are read with ``torch.load(weights_only=True)``:
tensors and plain types only. megatron-core's dist checkpoints contain three pickled parts that
megatron and torch.distributed.checkpoint unpickle with the full ``pickle`` (which can run code):
``.metadata``, ``common.pt`` and the small "bytes" items inside the ``.distcp`` files.
:func:`check_dist_checkpoint` reads each of them first with a restricted unpickler (only the
checkpoint-metadata classes, tensors and plain types) and refuses the directory, naming the file,
when anything else is in it. This guards against planted payloads; a file swapped between the
check and megatron's load is out of its reach (see docs/cluster.md, "Trusting checkpoints").
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import pickle
from pathlib import Path

import torch

# Modules whose dataclasses and enums a DCP ``.metadata`` file may name (plus the few below).
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a callable of a payload) raises."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _METADATA_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if dataclasses.is_dataclass(obj) or (isinstance(obj, type) and issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint-metadata type")


def load_plain(path: str | Path, what: str = "file"):
    """``torch.load(path, weights_only=True)``; a file holding anything but tensors and plain types
    is refused with a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load this {what}: it holds objects other than tensors "
                         f"and plain types ({str(e).splitlines()[0]})") from None


def read_dcp_metadata(path: str | Path):
    """The ``torch.distributed.checkpoint`` ``Metadata`` in ``path``, read with the restricted unpickler."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: refused to load this checkpoint metadata: {e}") from None


def check_dist_checkpoint(directory: str | Path) -> None:
    """Refuse (ValueError naming the file) a megatron dist checkpoint any of whose pickled parts
    holds more than metadata, tensors and plain types. Cheap: reads the metadata, ``common.pt`` and
    the small bytes items, never the tensors."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    directory = Path(directory)
    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        raise ValueError(f"{directory}: not a dist checkpoint (no .metadata)")
    metadata = read_dcp_metadata(metadata_file)
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{metadata_file}: not checkpoint metadata ({type(metadata).__name__})")
    if (directory / "common.pt").is_file():
        load_plain(directory / "common.pt", "checkpoint part")
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        rel = Path(info.relative_path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{metadata_file}: item {index.fqn!r} points outside the checkpoint ({rel})")
        if info.transform_descriptors:
            raise ValueError(f"{metadata_file}: item {index.fqn!r} is stored with transforms "
                             f"{info.transform_descriptors}, which this loader does not check")
        with (directory / rel).open("rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{directory / rel}: refused to load item {index.fqn!r}: it holds objects "
                             f"other than tensors and plain types ({str(e).splitlines()[0]})") from None
