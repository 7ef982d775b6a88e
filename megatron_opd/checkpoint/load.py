"""Build a sharded model from whatever checkpoint directory a user points at."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd import parallel
from megatron_opd.checkpoint import mcore
from megatron_opd.checkpoint.hf_weights import load_hf_weights
from megatron_opd.models.builder import ShardedModel, build_model
from megatron_opd.models.config import ArchConfig
from megatron_opd.parallel import ModelParallel


def model_arch(path: str | Path) -> ArchConfig:
    """The architecture of an HF model directory or a megatron_opd checkpoint, without loading
    weights (to check a layout before building anything)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: model directory does not exist")
    if mcore.is_mcore_checkpoint(path):
        return ArchConfig.from_dict(mcore.read_meta(path)["arch"])
    return ArchConfig.from_hf_dir(path)


def load_model(path: str | Path, mp: ModelParallel, *, params_dtype: torch.dtype = torch.float32,
               seed: int = 1234, moe_aux_loss_coeff: float = 0.0) -> ShardedModel:
    """An HF model directory (config.json + safetensors) or a megatron_opd checkpoint (converted
    or from training, loadable at any TP/PP/EP), loaded onto ``mp``'s ranks
    (``moe_aux_loss_coeff``: a mixture-of-experts model to train with megatron's load-balancing
    loss)."""
    path = Path(path)
    arch = model_arch(path)
    tp = mp.layout.tp
    padded = None
    if mcore.is_mcore_checkpoint(path):
        padded = int(mcore.read_meta(path)["padded_vocab_size"])
        if padded % tp:
            raise ValueError(f"{path}: its padded vocabulary ({padded}) is not divisible by tp={tp}")
    arch.check_parallel(tp=tp, pp=mp.layout.pp, ep=mp.layout.ep, etp=mp.layout.etp)
    parallel.seed(seed, mp)
    model = build_model(arch, mp, params_dtype=params_dtype, padded_vocab=padded, initialize=False,
                        moe_aux_loss_coeff=moe_aux_loss_coeff)
    if padded is None:
        load_hf_weights(model, path)
    else:
        mcore.load_weights(model, path)
    return model
