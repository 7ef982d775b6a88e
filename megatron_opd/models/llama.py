"""Llama family (Llama 2/3/3.1/3.2): the HF <-> megatron-core name table."""

from megatron_opd.models.family import GATE_UP, QKV, REPLICATED, ROW, VOCAB, Family, Param

ATTENTION_PARAMS = (
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Param("self_attention.linear_qkv.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
    Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
)

LAYER_PARAMS = ATTENTION_PARAMS + (
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GATE_UP),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
)

GLOBAL_PARAMS = (
    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Param("output_layer.weight", ("lm_head.weight",), VOCAB),
)

LLAMA = Family(
    model_type="llama",
    layer_params=LAYER_PARAMS,
    global_params=GLOBAL_PARAMS,
    required_values={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    hf_architecture="LlamaForCausalLM",
)
