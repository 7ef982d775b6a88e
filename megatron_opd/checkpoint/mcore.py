"""megatron-core distributed checkpoints (torch_dist) of a model, with the metadata to rebuild it.

A checkpoint directory holds ``megatron_opd.json`` (architecture, padded vocabulary, stored dtype),
``model/`` (the dist checkpoint, loadable at any TP/PP/EP: dist-checkpointing reshards) and the
tokenizer files. Converted models and the trainer's checkpoints share this layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.checkpoint.manifest import MANIFEST, signing_key, verify_manifest
from megatron_opd.checkpoint.trust import check_dist_checkpoint
from megatron_opd.models.builder import ShardedModel

META_FILE = "megatron_opd.json"
MODEL_SUBDIR = "model"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of an HF model directory that are not weights or the model config: tokenizer & co.
NON_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
NON_TOKENIZER_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST}


def is_mcore_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"{path}: not a megatron_opd checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e.msg})") from None
    for key in ("format_version", "arch", "padded_vocab_size", "dtype"):
        if key not in meta:
            raise ValueError(f"{meta_file}: missing field {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta['format_version']} is not supported "
                         f"(this megatron_opd reads {FORMAT_VERSION})")
    if not (path / MODEL_SUBDIR).is_dir():
        raise ValueError(f"{path}: no {MODEL_SUBDIR}/ directory with the weights")
    return meta


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer / generation-config files (everything but weights and config.json)."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in NON_TOKENIZER_FILES and not f.name.endswith(NON_TOKENIZER_SUFFIXES) \
                and f.name != META_FILE:
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied


def _cast_sharded(sharded_state_dict: dict, dtype: torch.dtype, *, empty: bool) -> dict:
    """Cast (or, with ``empty``, replace by uninitialised) tensor data in a sharded state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    def cast(x):
        if isinstance(x, (ShardedTensor, ShardedTensorFactory)) and x.data.is_floating_point() \
                and x.data.dtype != dtype:
            x.data = torch.empty_like(x.data, dtype=dtype) if empty else x.data.detach().to(dtype)
        return x

    return dict_list_map_inplace(cast, sharded_state_dict)


def dist_save(sharded_state_dict: dict, directory: str | Path) -> None:
    """``dist_checkpointing.save`` (torch_dist), synchronously, with every write inside this process.

    megatron's torch_dist writer forks one writer process per file it writes (a design for
    asynchronous saves) and collects their results through a spawned ``multiprocessing.Manager``.
    A rank killed mid-save leaves those children orphaned: hung on a lock, holding memory and the
    job's stdout/stderr (which keeps a Slurm step alive). Here megatron's own per-file writer runs
    in threads of the rank, which die with it, and the results go through a plain queue.
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    request = dist_checkpointing.save(sharded_state_dict, str(directory), async_sharded_save=True)
    if request.async_fn is not None:
        _write_in_threads(request)
    dist.barrier()
    for finalize in request.finalize_fns:
        finalize()


def _write_in_threads(request) -> None:
    """Do what megatron's ``write_preloaded_data_multiproc`` does, with threads for processes."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import Queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    fn = request.async_fn
    # canary: the pinned megatron-core hands back partial(write_preloaded_data_multiproc, transforms, use_msc)
    assert getattr(fn, "func", None) == FileSystemWriterAsync.write_preloaded_data_multiproc, fn
    transform_list, use_msc = fn.args
    _, buckets, results_queue = request.async_fn_args
    if request.preload_fn is not None:
        buckets = request.preload_fn()
    local, count = Queue(), Queue()
    with ThreadPoolExecutor(max_workers=len(buckets), thread_name_prefix="dist-save") as pool:
        for i, bucket in enumerate(buckets):
            count.put(i)
            pool.submit(FileSystemWriterAsync.write_preloaded_data, transform_list, i, bucket, local, count,
                        True, use_msc=use_msc)
    results: dict | Exception = {}
    while not local.empty():
        i, out = local.get()
        if isinstance(out, Exception):
            results = out
            break
        results[i] = out
    results_queue.put(results)


def save_model(model: ShardedModel, out_dir: str | Path, *, dtype: torch.dtype | None = None,
               extra_meta: dict | None = None) -> None:
    """Write ``model`` (all ranks participate) as a dist checkpoint into ``out_dir``."""
    out_dir = Path(out_dir)
    dtype = dtype or model.config.params_dtype
    (out_dir / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
    sd = _cast_sharded(model.module.sharded_state_dict(), dtype, empty=False)
    dist_save(sd, out_dir / MODEL_SUBDIR)
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "arch": model.arch.to_dict(),
                "padded_vocab_size": model.padded_vocab_size, "dtype": DTYPE_NAMES[dtype],
                "saved_layout": {"tp": model.mp.layout.tp, "pp": model.mp.layout.pp, "ep": model.mp.layout.ep}}
        meta.update(extra_meta or {})
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_weights(model: ShardedModel, path: str | Path) -> None:
    """Fill ``model`` (built for the checkpoint's architecture and padded vocabulary, at any
    TP/PP/EP) with the weights saved at ``path``; dist-checkpointing reshards."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    stored = DTYPES[read_meta(path)["dtype"]]
    if signing_key() is not None:  # only checkpoints written with the key
        verify_manifest(path, mode="hash")
    sd = _cast_sharded(model.module.sharded_state_dict(), stored, empty=True)
    check_dist_checkpoint(path / MODEL_SUBDIR)
    loaded = dist_checkpointing.load(sd, str(path / MODEL_SUBDIR))
    with torch.no_grad():
        model.module.load_state_dict(loaded, strict=True)
