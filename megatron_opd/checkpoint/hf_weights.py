"""Load HF safetensors weights straight into a sharded megatron model (each rank reads its slices)."""

from __future__ import annotations

import torch

from megatron_opd.checkpoint.safetensors_io import DTYPE_NAMES, HFCheckpoint
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.config import ArchConfig
from megatron_opd.models.layout import model_hf_shapes, shard_from_hf

# Buffers some HF exports carry that are not weights.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def validate_hf_checkpoint(ckpt: HFCheckpoint, arch: ArchConfig) -> None:
    """Check every key, shape and dtype against the config before anything is loaded."""
    expected = model_hf_shapes(arch)
    present = {k for k in ckpt.keys() if not k.endswith(IGNORED_HF_SUFFIXES)}
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied exports still carry the copy
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{ckpt.path}: tensor {missing[0]!r} is missing "
                         f"({len(missing)} missing in all)")
    extra = sorted(present - set(expected))
    if extra:
        raise ValueError(f"{ckpt.path}: tensor {extra[0]!r} ({ckpt.file_of(extra[0]).name}) is not "
                         f"part of a {arch.model_type} model with this config "
                         f"({len(extra)} unexpected in all)")
    for name, shape in expected.items():
        got = ckpt.shape(name)
        if got != shape:
            raise ValueError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(got)}, the "
                             f"config implies {list(shape)}")
        if ckpt.dtype(name) not in DTYPE_NAMES:
            raise ValueError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {ckpt.dtype(name)}, "
                             f"expected one of {', '.join(DTYPE_NAMES)}")


@torch.no_grad()
def load_hf_weights(model: ShardedModel, path) -> None:
    """Fill this rank's parameters of ``model`` from the HF checkpoint at ``path``."""
    ckpt = path if isinstance(path, HFCheckpoint) else HFCheckpoint(path)
    validate_hf_checkpoint(ckpt, model.arch)
    for ref in model.param_refs():
        tp_rank, tp_size, _ = model.split_of(ref.row)
        shard = shard_from_hf(ref.row, ref.hf_names, ckpt, model.arch, tp_rank=tp_rank,
                              tp_size=tp_size, padded_vocab=model.padded_vocab_size)
        if tuple(shard.shape) != tuple(ref.tensor.shape):
            raise AssertionError(f"{ref.name}: built shard {tuple(shard.shape)} != parameter "
                                 f"{tuple(ref.tensor.shape)}")
        ref.tensor.copy_(shard)
