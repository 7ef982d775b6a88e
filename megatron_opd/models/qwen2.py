"""Qwen2 / Qwen2.5 family: Llama's table plus biases on q, k and v."""

from megatron_opd.models.family import QKV, Family, Param
from megatron_opd.models.llama import GLOBAL_PARAMS, LAYER_PARAMS

QWEN2 = Family(
    model_type="qwen2",
    layer_params=LAYER_PARAMS + (
        Param("self_attention.linear_qkv.bias",
              ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), QKV),
    ),
    global_params=GLOBAL_PARAMS,
    qkv_bias=True,
    required_values={"hidden_act": "silu", "use_sliding_window": False},
    hf_architecture="Qwen2ForCausalLM",
)
