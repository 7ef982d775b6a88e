"""HF <-> megatron-core checkpoint conversion, bit-exact, at any TP/PP/EP (run under torchrun).

hf-to-mcore: each rank reads only the slices it owns, then all ranks write one dist checkpoint.
mcore-to-hf: the checkpoint is loaded at the launch layout, and HF tensors stream bucket by bucket
out of the resharding executor that also feeds the rollout engines (so an export holds exactly the
weights an engine gets); rank 0 writes safetensors shards. Outputs are staged and renamed into place when
complete; validation errors come before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.checkpoint import mcore
from megatron_opd.checkpoint.hf_weights import load_hf_weights, validate_hf_checkpoint
from megatron_opd.checkpoint.load import load_model
from megatron_opd.checkpoint.manifest import write_manifest
from megatron_opd.checkpoint.publish import check_output_dir, staged_output
from megatron_opd.checkpoint.safetensors_io import (DTYPE_NAMES, HFCheckpoint, ShardedSafetensorsWriter,
                                                    parse_size)
from megatron_opd.models.builder import build_model
from megatron_opd.models.config import ArchConfig
from megatron_opd.rollout.sync import WeightSync
from megatron_opd.utils import log0, progress

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, layout: parallel.ParallelLayout,
                dtype: str | None = None, force: bool = False) -> None:
    """Convert the HF model at ``hf_dir`` into a megatron_opd checkpoint at ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir, force=force)
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir}: HF model directory does not exist")
    arch = ArchConfig.from_hf_dir(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    validate_hf_checkpoint(ckpt, arch)
    source_dtype = _single_dtype(ckpt)
    arch.check_parallel(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp, what="convert")
    mp = parallel.initialize_global_model_parallel(layout, what="convert")
    parallel.seed(0, mp)
    model = build_model(arch, mp, initialize=False)
    stored = HF_DTYPES[dtype] if dtype else source_dtype
    load_hf_weights(model, ckpt)
    log0(f"loaded {hf_dir} at tp={layout.tp} pp={layout.pp} ep={layout.ep}; writing {out_dir}")
    with staged_output(out_dir, force=force) as staging:
        mcore.save_model(model, staging, dtype=stored,
                         extra_meta={"hf_dtype": mcore.HF_DTYPE_NAMES[source_dtype],
                                     "source": str(hf_dir)})
        if dist.get_rank() == 0:
            mcore.copy_tokenizer_files(hf_dir, staging)
        dist.barrier()
        write_manifest(staging)
    log0(f"wrote {out_dir}")


def _single_dtype(ckpt: HFCheckpoint) -> torch.dtype:
    """The one floating dtype of every tensor (what the export writes back, for bit-exact round
    trips); a mixed or float64 checkpoint is refused, naming a tensor."""
    first = "model.embed_tokens.weight"
    name = ckpt.dtype(first)
    for key in sorted(ckpt.keys()):
        if ckpt.dtype(key) != name:
            raise ValueError(f"{ckpt.file_of(key)}: tensor {key!r} is {ckpt.dtype(key)} but {first!r} is "
                             f"{name}: a checkpoint to convert must have a single dtype")
    if DTYPE_NAMES[name] not in mcore.HF_DTYPE_NAMES:
        raise ValueError(f"{ckpt.file_of(first)}: tensors are {name}; conversion supports "
                         f"{', '.join(mcore.HF_DTYPE_NAMES.values())} (cast the checkpoint first)")
    return DTYPE_NAMES[name]


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, *, layout: parallel.ParallelLayout,
                dtype: str | None = None, max_shard_size: str = "5GB", force: bool = False) -> None:
    """Export the megatron_opd checkpoint at ``mcore_dir`` as an HF model directory."""
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    check_output_dir(out_dir, force=force)
    meta = mcore.read_meta(mcore_dir)
    max_bytes = parse_size(max_shard_size)
    hf_dtype_name = meta.get("hf_dtype", "float32")
    export = HF_DTYPES[dtype] if dtype else {v: k for k, v in mcore.HF_DTYPE_NAMES.items()}[hf_dtype_name]
    mp = parallel.initialize_global_model_parallel(layout, what="convert")
    model = load_model(mcore_dir, mp)
    write_hf_model(model, out_dir, dtype=export, max_shard_bytes=max_bytes, force=force,
                   tokenizer_src=mcore_dir)
    log0(f"wrote {out_dir}")


def write_hf_model(model, out_dir: str | Path, *, dtype: torch.dtype, max_shard_bytes: int,
                   force: bool = False, tokenizer_src: str | Path | None = None,
                   bucket_bytes: int = 256 << 20) -> None:
    """Write the live sharded ``model`` as an HF model directory (collective; rank 0 writes)."""
    arch = model.arch
    names = model.hf_names()  # an engine also gets a tied model's lm_head copy; HF stores it once
    with staged_output(out_dir, force=force) as staging:
        rank0 = dist.get_rank() == 0
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes=max_shard_bytes) if rank0 else None
        bar = progress(total=len(names), desc="exporting", unit="tensor")
        for name, tensor in WeightSync(model, bucket_bytes=bucket_bytes).iter_hf_tensors():
            if name not in names:
                continue
            if rank0:
                writer.add(name, tensor.to(dtype))
            bar.update()
        bar.close()
        if rank0:
            files = writer.close()
            config = dict(arch.hf_config)
            dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[dtype_key] = mcore.HF_DTYPE_NAMES[dtype]
            config.setdefault("architectures", [arch.family.hf_architecture])
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if tokenizer_src is not None:
                mcore.copy_tokenizer_files(tokenizer_src, staging)
            log0(f"wrote {len(files)} safetensors file(s), {writer.total_bytes / 1e6:.1f} MB")
