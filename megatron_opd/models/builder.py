"""Build a tensor/pipeline-parallel megatron-core ``GPTModel`` for an HF architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_opd import parallel
from megatron_opd.models.config import ArchConfig, padded_vocab_size, rope_inv_freq, transformer_config
from megatron_opd.models.family import (EXPERT, HF_LAYER_PREFIX, MCORE_LAYER_PREFIX, REPLICATED, ROW,
                                         TE_RENAMES, Param)
from megatron_opd.models.layout import model_hf_shapes
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
    expert: int | None = None  # global expert index of a per-expert row


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

    @property
    def num_local_experts(self) -> int:
        return self.arch.num_experts // self.mp.layout.ep

    def split_of(self, row: Param) -> tuple[int, int, "torch.distributed.ProcessGroup"]:
        """(rank, size, group) of the tensor-parallel split a row's shards follow: the expert
        tensor-parallel group for per-expert rows, the tensor-parallel group for the rest."""
        if row.per_expert:
            return self.mp.etp_rank, self.mp.layout.expert_tp, self.mp.expt_tp_group
        return self.mp.tp_rank, self.mp.layout.tp, self.mp.tp_group

    def param_refs(self) -> Iterator[ParamRef]:
        """Every local parameter with its HF names; raises if one is not in the family table."""
        family = self.arch.family
        te_back = {te: local for local, te in TE_RENAMES.items()}
        layer_rows = {p.mcore: p for p in family.layer_params if not p.per_expert}
        expert_rows = [(_expert_pattern(p), p) for p in family.layer_params if p.per_expert]
        global_rows = {p.mcore: p for p in family.global_params}
        layer_numbers = [layer.layer_number - 1 for layer in self.module.decoder.layers]
        first_expert = self.mp.ep_rank * self.num_local_experts if expert_rows else 0
        for name, tensor in self.module.named_parameters():
            if name.startswith("decoder.layers."):
                local_idx, rest = name[len("decoder.layers."):].split(".", 1)
                rest = te_back.get(rest, rest)
                layer = layer_numbers[int(local_idx)]
                prefix = HF_LAYER_PREFIX.format(layer=layer)
                if rest in layer_rows:
                    row = layer_rows[rest]
                    yield ParamRef(name, tensor, row, tuple(prefix + n for n in row.hf), layer)
                    continue
                match = next(((m, p) for pattern, p in expert_rows if (m := pattern.fullmatch(rest))), None)
                if match is None:
                    raise KeyError(f"parameter {name} is not in the {family.model_type} table")
                m, row = match
                expert = first_expert + int(m.group(1))
                yield ParamRef(name, tensor, row, tuple(prefix + n for n in row.hf_names(expert=expert)),
                               layer, expert)
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
        return set(model_hf_shapes(self.arch))


def mcore_layer_name(rest: str, layer: int) -> str:
    return MCORE_LAYER_PREFIX.format(layer=layer) + rest


def _expert_pattern(row: Param) -> re.Pattern:
    """Matches a per-expert row's megatron name (within a layer); group 1 is the local expert."""
    before, after = row.mcore.split(EXPERT)
    return re.compile(re.escape(before) + r"(\d+)" + re.escape(after))


class TorchRMSNorm(torch.nn.RMSNorm):
    """megatron's local-spec norm (``WrappedTorchNorm`` builds this same torch RMSNorm) that also
    runs under sequence parallelism: its weight carries megatron's ``sequence_parallel`` mark, so
    ``finalize_model_grads`` sums the gradients of the TP ranks' sequence shards."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise AssertionError(f"TorchRMSNorm built for normalization={config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def build_model(arch: ArchConfig, mp: ModelParallel, *, params_dtype: torch.dtype = torch.float32,
                padded_vocab: int | None = None, initialize: bool = True,
                recompute: bool = False, sequence_parallel: bool = False,
                moe_aux_loss_coeff: float = 0.0, config_extra: dict | None = None) -> ShardedModel:
    """This rank's pipeline stage of ``arch`` on the groups of ``mp``.

    Seed first (:func:`megatron_opd.parallel.seed`) when ``initialize`` is true: megatron draws
    the TP-sharded initial weights from the model-parallel RNG stream. ``config_extra`` sets
    further ``TransformerConfig`` fields (e.g. dropout in tests). A mixture-of-experts model
    holds ``num_experts / ep`` experts per rank (megatron's SequentialMLP: one MLP per expert,
    the family table's per-expert rows); ``moe_aux_loss_coeff`` > 0 turns megatron's
    load-balancing loss on.
    """
    from megatron.core.models.gpt import GPTModel

    tp, pp = mp.layout.tp, mp.layout.pp
    config = transformer_config(arch, tp=tp, pp=pp, ep=mp.layout.ep, etp=mp.layout.expert_tp,
                                params_dtype=params_dtype, initialize=initialize,
                                moe_aux_loss_coeff=moe_aux_loss_coeff, recompute=recompute,
                                sequence_parallel=sequence_parallel, extra=config_extra)
    te = transformer_engine_available()
    spec = decoder_spec(arch, transformer_engine=te, num_layers=arch.num_layers // pp)
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


def decoder_spec(arch: ArchConfig, *, transformer_engine: bool, num_layers: int):
    """The decoder spec of a stage of ``num_layers`` layers. Both attentions honour
    ``packed_seq_params`` (THD packs): with Transformer Engine its ``TEDotProductAttention``;
    otherwise megatron's local spec with our
    :class:`~megatron_opd.models.attention.VarlenAttention` as core attention (the local
    ``DotProductAttention`` refuses packed sequences) and every norm a :class:`TorchRMSNorm`
    (megatron's own refuses sequence parallelism, which MoE layers need for training at TP > 1).
    A mixture-of-experts family gets megatron's MoE layer (router, SequentialMLP experts)."""
    num_experts = arch.num_experts or None
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                                          qk_layernorm=arch.family.qk_norm)
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_opd.models.attention import VarlenAttention

    def swap(node):
        if node is WrappedTorchNorm:
            return TorchRMSNorm
        if isinstance(node, ModuleSpec) or (dataclasses.is_dataclass(node) and not isinstance(node, type)):
            return dataclasses.replace(node, **{f.name: swap(getattr(node, f.name))
                                                for f in dataclasses.fields(node) if f.init})
        return node

    layer = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                     qk_layernorm=arch.family.qk_norm, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = VarlenAttention
    return TransformerBlockSubmodules(layer_specs=[swap(layer)] * num_layers, layer_norm=TorchRMSNorm)


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
