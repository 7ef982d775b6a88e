"""Build a sharded model from whatever checkpoint directory a user points at."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd import parallel
from megatron_opd.models.builder import ShardedModel, build_model
from megatron_opd.models.config import ArchConfig
from megatron_opd.parallel import ModelParallel


def model_arch(path: str | Path) -> ArchConfig:
    """The architecture of an HF model directory or a megatron_opd checkpoint, without loading
    weights (to check a layout before building anything)."""
    from megatron_opd.checkpoint import mcore

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: model directory does not exist")
    if mcore.is_mcore_checkpoint(path):
        return ArchConfig.from_dict(mcore.read_meta(path)["arch"])
    return ArchConfig.from_hf_dir(path)


def load_model(path: str | Path, mp: ModelParallel, *, params_dtype: torch.dtype = torch.float32,
               seed: int = 1234) -> ShardedModel:
    """An HF model directory (config.json + safetensors) or a megatron_opd checkpoint (converted
    or from training), loaded onto ``mp``'s ranks."""
    from megatron_opd.checkpoint import mcore
    from megatron_opd.checkpoint.hf_weights import load_hf_weights

    path = Path(path)
    arch = model_arch(path)
    if mcore.is_mcore_checkpoint(path):
        return mcore.load_model(path, mp, params_dtype=params_dtype, seed=seed)
    arch.check_parallel(tp=mp.layout.tp, pp=mp.layout.pp, ep=mp.layout.ep, etp=mp.layout.etp)
    parallel.seed(seed, mp)
    model = build_model(arch, mp, params_dtype=params_dtype, initialize=False)
    load_hf_weights(model, path)
    return model
