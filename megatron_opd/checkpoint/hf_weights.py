"""Load HF safetensors weights straight into a sharded megatron model (each rank reads its slices)."""

from __future__ import annotations

import torch

from megatron_opd import parallel
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


def _gather_tp(tensor: torch.Tensor, model: ShardedModel, group=None, size: int | None = None) -> list[torch.Tensor]:
    size = model.mp.layout.tp if size is None else size
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=model.mp.tp_group if group is None else group)
    return parts


def _gather_experts(ref, tensor: torch.Tensor, model: ShardedModel) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one local expert's parameter on every expert-parallel rank: merged over
    the expert tensor-parallel group, then gathered over the expert-parallel group (collective
    over every rank of the stage)."""
    from megatron_opd.models.family import HF_LAYER_PREFIX
    from megatron_opd.models.layout import hf_from_shards

    _, etp, group = model.split_of(ref.row)
    shards = _gather_tp(tensor, model, group, etp)
    merged = hf_from_shards(ref.row, ref.hf_names, shards, model.arch)
    flat = torch.cat([merged[n].reshape(-1) for n in ref.hf_names])
    ep = model.mp.layout.ep
    parts = [flat] if ep == 1 else [torch.empty_like(flat) for _ in range(ep)]
    if ep > 1:
        torch.distributed.all_gather(parts, flat, group=model.mp.ep_group)
    local = ref.expert - model.mp.ep_rank * model.num_local_experts
    prefix = HF_LAYER_PREFIX.format(layer=ref.layer)
    out = []
    for ep_rank, part in enumerate(parts):
        names = [prefix + n for n in ref.row.hf_names(expert=ep_rank * model.num_local_experts + local)]
        offset = 0
        for name, template in zip(names, ref.hf_names):
            n = merged[template].numel()
            out.append((name, part[offset:offset + n].view(merged[template].shape).clone()))
            offset += n
    return out


@torch.no_grad()
def iter_hf_tensors(model: ShardedModel, *, grads: bool = False):
    """Yield ``(hf_name, tensor)`` for the whole model on one rank: pipeline stage 0, TP rank 0 of
    data-parallel replica 0. Every rank of the model must exhaust the iterator (collectives).

    With ``grads`` the tensors are the gradients (megatron DDP's ``main_grad`` when present).
    Tensors travel one at a time, so no rank holds more than a stage plus one tensor (experts:
    one parameter of every expert-parallel rank). Experts live on the expert-parallel ranks,
    which span data-parallel replicas: every rank takes part in gathering them.
    """
    from megatron_opd.models.layout import hf_from_shards

    mp = model.mp
    primary = mp.dp_rank == 0
    dst = mp.global_rank(tp_rank=0, pp_rank=0, dp_rank=0)
    me = torch.distributed.get_rank()
    for stage in range(mp.layout.pp):
        src = mp.global_rank(tp_rank=0, pp_rank=stage, dp_rank=0)
        out: list[tuple[str, torch.Tensor]] = []
        if mp.pp_rank == stage:
            for ref in model.param_refs():
                if ref.name == "output_layer.weight" and model.arch.tie_word_embeddings:
                    continue  # the stage-0 embedding is the tied tensor's source of truth
                t = ref.tensor
                if grads:
                    t = getattr(t, "main_grad", None) if getattr(t, "main_grad", None) is not None else t.grad
                    if t is None:
                        t = torch.zeros_like(ref.tensor)
                if ref.row.per_expert:
                    tensors = _gather_experts(ref, t.detach(), model)
                    if me == src:
                        out.extend(tensors)
                elif primary:
                    shards = _gather_tp(t.detach(), model)
                    if mp.tp_rank == 0:
                        merged = hf_from_shards(ref.row, ref.hf_names, shards, model.arch)
                        # Copies, so later in-place updates (clipping, optimizer) do not alter them.
                        out.extend((n, t.clone()) for n, t in merged.items())
        if not primary:
            continue
        if src == dst:
            if me == dst:
                yield from out
            continue
        if me == src:
            meta = [[(n, tuple(t.shape), t.dtype) for n, t in out]]
            torch.distributed.send_object_list(meta, dst=dst)
            for _, t in out:
                torch.distributed.send(t.contiguous(), dst=dst)
        elif me == dst:
            meta = [None]
            torch.distributed.recv_object_list(meta, src=src)
            for name, shape, dtype in meta[0]:
                t = torch.empty(shape, dtype=dtype, device=parallel.device())
                torch.distributed.recv(t, src=src)
                yield name, t
