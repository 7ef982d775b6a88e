"""megatron-core distributed checkpoints (torch_dist) of a model, with the metadata to rebuild it.

A checkpoint directory holds ``megatron_opd.json`` (architecture, padded vocabulary, stored dtype),
``model/`` (the dist checkpoint, loadable at any TP/PP: dist-checkpointing reshards) and the
tokenizer files. Converted models and the trainer's checkpoints share this layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.models.builder import ShardedModel, build_model
from megatron_opd.models.config import ArchConfig
from megatron_opd.parallel import ModelParallel

META_FILE = "megatron_opd.json"
MODEL_SUBDIR = "model"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of an HF model directory that are not weights or the model config: tokenizer & co.
NON_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
NON_TOKENIZER_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


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
    """``dist_checkpointing.save``, synchronously, without megatron's results-queue manager.

    megatron's torch_dist writer hands write results back through a queue that, by default, is
    served by a spawned ``multiprocessing.Manager`` process (made for asynchronous saves). We save
    synchronously, so a plain in-process queue does the same job; this spares a process start per
    rank and leaves no orphaned manager (holding the job's stdout) when a rank is killed.
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, str(directory))


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


def load_model(path: str | Path, mp: ModelParallel, *, params_dtype: torch.dtype = torch.float32,
               seed: int = 1234) -> ShardedModel:
    """Rebuild the model saved at ``path`` on ``mp``'s layout (any TP/PP/EP) and load its weights."""
    from megatron.core import dist_checkpointing

    from megatron_opd import parallel

    path = Path(path)
    meta = read_meta(path)
    arch = ArchConfig.from_dict(meta["arch"])
    padded = int(meta["padded_vocab_size"])
    tp = mp.layout.tp
    if padded % tp:
        raise ValueError(f"{path}: its padded vocabulary ({padded}) is not divisible by tp={tp}")
    arch.check_parallel(tp=tp, pp=mp.layout.pp, ep=mp.layout.ep, etp=mp.layout.etp)
    parallel.seed(seed, mp)
    model = build_model(arch, mp, params_dtype=params_dtype, padded_vocab=padded, initialize=False)
    stored = DTYPES[meta["dtype"]]
    sd = _cast_sharded(model.module.sharded_state_dict(), stored, empty=True)
    loaded = dist_checkpointing.load(sd, str(path / MODEL_SUBDIR))
    with torch.no_grad():
        model.module.load_state_dict(loaded, strict=True)
    return model
