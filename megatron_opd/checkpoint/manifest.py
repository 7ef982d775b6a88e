"""Checkpoint manifests: every file's size and sha256, written before a checkpoint is published
and verified before it is loaded, so a truncated or corrupted file is refused by name.

With a key in ``MEGATRON_OPD_CHECKPOINT_KEY``, manifests are signed (HMAC-SHA256 over the file
list) when written, and on load the signature must match and every file's hash is checked: a
checkpoint that was not written with the key, or was changed afterwards, is refused.

Hashing is spread over the ranks (each hashes every world_size-th file).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
KEY_ENV = "MEGATRON_OPD_CHECKPOINT_KEY"


def signing_key() -> bytes | None:
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def _signature(entries: dict, key: bytes) -> str:
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _spread(items: list, fn) -> dict:
    """``{item: fn(item)}`` with the work split over the ranks (a plain loop without dist)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {i: fn(i) for i in items}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {i: fn(i) for i in items[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = {}
    for p in parts:
        out.update(p)
    return out


def write_manifest(root: str | Path) -> None:
    """Record every file under ``root`` (collective; rank 0 writes)."""
    root = Path(root)
    files = _files(root) if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        box = [files]
        dist.broadcast_object_list(box, src=0)
        files = box[0]
    digests = _spread(files, lambda f: _sha256(root / f))
    if not dist.is_initialized() or dist.get_rank() == 0:
        entries = {f: {"size": (root / f).stat().st_size, "sha256": digests[f]} for f in files}
        manifest = {"files": entries}
        key = signing_key()
        if key is not None:
            manifest["hmac_sha256"] = _signature(entries, key)
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify_manifest(root: str | Path, *, mode: str = "hash") -> None:
    """Raise ValueError naming the first missing, truncated or corrupted file (collective). With
    a signing key set, the signature is checked and so is every hash, whatever ``mode`` says."""
    key = signing_key()
    if key is not None:
        mode = "hash"
    if mode == "none":
        return
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{root}: no {MANIFEST}; the checkpoint is incomplete or predates manifests "
                         "(set checkpoint.verify=none to load it anyway)")
    try:
        data = json.loads(manifest.read_text())
        entries = data["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest}: unreadable ({e!r})") from None
    if key is not None:
        if "hmac_sha256" not in data:
            raise ValueError(f"{manifest}: not signed, and {KEY_ENV} is set: only checkpoints written "
                             "with the key are loaded")
        if not hmac.compare_digest(str(data["hmac_sha256"]), _signature(entries, key)):
            raise ValueError(f"{manifest}: the signature does not match {KEY_ENV} (written with "
                             "another key, or changed after it was written)")
        unlisted = sorted(set(_files(root)) - set(entries))
        if unlisted:
            raise ValueError(f"{root / unlisted[0]}: not in the signed {MANIFEST} (added after it was written)")
    for name, entry in sorted(entries.items()):
        path = root / name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{path}: size {size} bytes, the manifest says {entry['size']} "
                             "(truncated or overwritten)")
    if mode == "hash":
        names = sorted(entries)
        digests = _spread(names, lambda f: _sha256(root / f))
        for name in names:
            if digests[name] != entries[name]["sha256"]:
                raise ValueError(f"{root / name}: sha256 does not match {MANIFEST} (corrupted)")
