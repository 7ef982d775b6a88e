"""Qwen3 (dense) family: Llama's table plus RMSNorm on each head's queries and keys."""

from megatron_opd.models.family import REPLICATED, Family, Param
from megatron_opd.models.llama import GLOBAL_PARAMS, LAYER_PARAMS

QK_NORM_PARAMS = (
    Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED),
    Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED),
)

QWEN3 = Family(
    model_type="qwen3",
    layer_params=LAYER_PARAMS + QK_NORM_PARAMS,
    global_params=GLOBAL_PARAMS,
    qk_norm=True,
    required_values={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
    hf_architecture="Qwen3ForCausalLM",
)
