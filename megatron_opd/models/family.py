"""The shape of a per-architecture table: which megatron-core parameter comes from which HF tensors.

A family file (llama.py, qwen2.py, ...) is a list of :class:`Param` rows plus a few flags. The
transforms that a row's ``layout`` names live in :mod:`megatron_opd.models.layout`; every consumer
(HF loading, conversion both ways, the vLLM bridge) reads this one table.

A mixture-of-experts row is a pattern over expert indices: ``{expert}`` in its names stands for
the expert's index, local to the expert-parallel rank in the megatron name (``local_experts.0``
on every EP rank) and global in the HF names (``experts.5``); such a row is split over the
expert tensor-parallel group instead of the tensor-parallel one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How a megatron parameter is laid out relative to its HF tensor(s), and how TP splits it.
REPLICATED = "replicated"  # same full tensor on every TP rank (norms)
COLUMN = "column"          # split along dim 0 (output features)
ROW = "row"                # split along dim 1 (input features)
VOCAB = "vocab"            # rows padded to the padded vocabulary, then split along dim 0
QKV = "qkv"                # q, k, v fused and interleaved per query group, groups split over TP
GATE_UP = "gate_up"        # gate and up stacked per TP rank: [gate_r; up_r]
LAYOUTS = (REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP)

EXPERT = "{expert}"  # the expert index in a per-expert row's names


@dataclass(frozen=True)
class Param:
    """One megatron parameter and the HF tensors it is made of.

    Names inside a decoder layer are relative to ``decoder.layers.{i}.`` (megatron) and
    ``model.layers.{i}.`` (HF); global names are absolute.
    """

    mcore: str
    hf: tuple[str, ...]
    layout: str

    def __post_init__(self):
        assert self.layout in LAYOUTS, self.layout
        assert all((EXPERT in n) == self.per_expert for n in self.hf), self

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    def mcore_name(self, *, local_expert: int | None = None) -> str:
        return self.mcore.format(expert=local_expert) if self.per_expert else self.mcore

    def hf_names(self, *, expert: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(expert=expert) for n in self.hf) if self.per_expert else self.hf

    def experts(self, num_experts: int) -> range:
        """The expert indices this row stands for: every expert, or one pass for a plain row."""
        return range(num_experts) if self.per_expert else range(1)


@dataclass(frozen=True)
class MoE:
    """Where a mixture-of-experts family's config keeps its routing settings."""

    num_experts_keys: tuple[str, ...]  # the first one present counts
    expert_ffn_key: str
    top_k_key: str = "num_experts_per_tok"
    # Config key of "renormalise the top-k probabilities"; None: always renormalised.
    renormalize_key: str | None = None


@dataclass(frozen=True)
class Family:
    """An HF architecture family: its name table and what its config may contain."""

    model_type: str
    layer_params: tuple[Param, ...]
    global_params: tuple[Param, ...]
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: bool = False  # config.sliding_window maps to megatron's attention window
    moe: MoE | None = None  # every decoder layer's MLP is a routed mixture of experts
    # HF config fields that must hold these values (anything else is a feature we do not build).
    required_values: dict = field(default_factory=dict)
    hf_architecture: str = ""


MCORE_LAYER_PREFIX = "decoder.layers.{layer}."
HF_LAYER_PREFIX = "model.layers.{layer}."

# Transformer Engine fuses the pre-attention and pre-MLP norms into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
