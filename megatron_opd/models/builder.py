"""Build a tensor/pipeline-parallel megatron-core ``GPTModel`` for an HF architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_opd import parallel
from megatron_opd.models.config import ArchConfig, padded_vocab_size, rope_inv_freq, transformer_config
from megatron_opd.models.family import (HF_LAYER_PREFIX, MCORE_LAYER_PREFIX, REPLICATED, ROW,
                                         TE_RENAMES, Param)
from megatron_opd.parallel import ModelParallel


def transformer_engine_available() -> bool:
    if not parallel.cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ParamRef:
    """One local megatron parameter with the table row and the HF names it corresponds to."""

    name: str
    tensor: torch.nn.Parameter
    row: Param
    hf_names: tuple[str, ...]
    layer: int | None  # global 0-based layer index, None for embeddings / final norm / head


@dataclass
class ShardedModel:
    """A megatron ``GPTModel`` stage on this rank plus what it takes to map it to HF names."""

    arch: ArchConfig
    mp: ModelParallel
    module: torch.nn.Module
    padded_vocab_size: int
    te_spec: bool

    @property
    def config(self):
        return self.module.config

    def layer_range(self) -> range:
        """Global indices of the decoder layers held by this pipeline stage."""
        numbers = [layer.layer_number - 1 for layer in self.module.decoder.layers]
        return range(numbers[0], numbers[-1] + 1) if numbers else range(0)

    def param_refs(self) -> Iterator[ParamRef]:
        """Every local parameter with its HF names; raises if one is not in the family table."""
        family = self.arch.family
        te_back = {te: local for local, te in TE_RENAMES.items()}
        layer_rows = {p.mcore: p for p in family.layer_params}
        global_rows = {p.mcore: p for p in family.global_params}
        layer_numbers = [layer.layer_number - 1 for layer in self.module.decoder.layers]
        for name, tensor in self.module.named_parameters():
            if name.startswith("decoder.layers."):
                local_idx, rest = name[len("decoder.layers."):].split(".", 1)
                rest = te_back.get(rest, rest)
                if rest not in layer_rows:
                    raise KeyError(f"parameter {name} is not in the {family.model_type} table")
                row = layer_rows[rest]
                layer = layer_numbers[int(local_idx)]
                prefix = HF_LAYER_PREFIX.format(layer=layer)
                yield ParamRef(name, tensor, row, tuple(prefix + n for n in row.hf), layer)
            else:
                if name not in global_rows:
                    raise KeyError(f"parameter {name} is not in the {family.model_type} table")
                row = global_rows[name]
                hf_names = row.hf
                if name == "output_layer.weight" and self.arch.tie_word_embeddings:
                    # Last-stage copy of the tied embedding (PP > 1): HF stores it once.
                    hf_names = global_rows["embedding.word_embeddings.weight"].hf
                yield ParamRef(name, tensor, row, hf_names, None)

    def hf_names(self) -> set[str]:
        """All HF tensor names the whole model (every stage) consists of."""
        family = self.arch.family
        names = set()
        for layer in range(self.arch.num_layers):
            prefix = HF_LAYER_PREFIX.format(layer=layer)
            names.update(prefix + n for p in family.layer_params for n in p.hf)
        for p in family.global_params:
            if p.mcore == "output_layer.weight" and self.arch.tie_word_embeddings:
                continue
            names.update(p.hf)
        return names


def mcore_layer_name(rest: str, layer: int) -> str:
    return MCORE_LAYER_PREFIX.format(layer=layer) + rest


def build_model(arch: ArchConfig, mp: ModelParallel, *, params_dtype: torch.dtype = torch.float32,
                padded_vocab: int | None = None, initialize: bool = True,
                recompute: bool = False, sequence_parallel: bool = False,
                config_extra: dict | None = None) -> ShardedModel:
    """This rank's pipeline stage of ``arch`` on the groups of ``mp``.

    Seed first (:func:`megatron_opd.parallel.seed`) when ``initialize`` is true: megatron draws
    the TP-sharded initial weights from the model-parallel RNG stream. ``config_extra`` sets
    further ``TransformerConfig`` fields (e.g. dropout in tests).
    """
    from megatron.core.models.gpt import GPTModel

    tp, pp = mp.layout.tp, mp.layout.pp
    config = transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype, initialize=initialize,
                                recompute=recompute, sequence_parallel=sequence_parallel,
                                extra=config_extra)
    te = transformer_engine_available()
    spec = layer_spec(arch, transformer_engine=te)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(arch.vocab_size, tp)
    if padded_vocab % tp or padded_vocab < arch.vocab_size:
        raise ValueError(f"padded vocabulary {padded_vocab} must be >= vocab_size "
                         f"{arch.vocab_size} and divisible by tp={tp}")
    device = parallel.device()
    with torch.device(device):  # what megatron allocates without a device (the torch norms) lands here
        module = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=mp.is_first_stage,
            post_process=mp.is_last_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            pg_collection=mp.pg_collection,
        )
    # The local spec's norms are torch norms created in fp32 whatever params_dtype says (megatron's
    # training script casts the whole model to bf16 afterwards, as TE's norms would be built).
    # In place, parameter by parameter: the Parameter objects (and megatron's marks on them) stay.
    with torch.no_grad():
        for p in module.parameters():
            if p.dtype != params_dtype or p.device != device:
                p.data = p.data.to(device=device, dtype=params_dtype)
        for b in module.buffers():
            if b.device != device:
                b.data = b.data.to(device)
    # megatron computes RoPE frequencies its own way (fixed Llama-3 constants); use HF's exactly
    # (in fp32 for every params_dtype, as megatron and transformers keep them).
    # Packed (THD) rows restart every sequence at position 0: megatron's RoPE takes the first
    # s_i angles per sequence of cu_seqlens, as vLLM and transformers do.
    module.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(device)
    model = ShardedModel(arch=arch, mp=mp, module=module, padded_vocab_size=padded_vocab, te_spec=te)
    _mark_tensor_parallel(model)
    return model


def layer_spec(arch: ArchConfig, *, transformer_engine: bool):
    """The decoder layer spec. Both attentions honour ``packed_seq_params`` (THD packs): with
    Transformer Engine its ``TEDotProductAttention``; otherwise megatron's local spec with our
    :class:`~megatron_opd.models.attention.VarlenAttention` as core attention (the local
    ``DotProductAttention`` refuses packed sequences)."""
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.family.qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_opd.models.attention import VarlenAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.family.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = VarlenAttention
    return spec


def _mark_tensor_parallel(model: ShardedModel) -> None:
    """Tag TP-sharded parameters from the family table.

    megatron-core only sets ``tensor_model_parallel`` while initialising weights; built with
    ``perform_initialization=False`` every weight looks replicated, and the optimizer's grad norm
    (hence clipping) silently ignores the shards of TP ranks > 0.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for ref in model.param_refs():
        if getattr(ref.tensor, "tensor_model_parallel", False) or ref.row.layout == REPLICATED:
            continue
        dim = 1 if ref.row.layout == ROW else 0
        set_tensor_model_parallel_attributes(ref.tensor, True, dim, 1)
