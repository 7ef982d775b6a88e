"""Mixtral family: Mistral's attention and, in every layer, a router over SwiGLU experts
(w1 = gate, w3 = up, w2 = down); the top-k probabilities are always renormalised."""

from megatron_opd.models.family import GATE_UP, REPLICATED, ROW, Family, MoE, Param
from megatron_opd.models.llama import ATTENTION_PARAMS, GLOBAL_PARAMS

MIXTRAL = Family(
    model_type="mixtral",
    layer_params=ATTENTION_PARAMS + (
        Param("mlp.router.weight", ("block_sparse_moe.gate.weight",), REPLICATED),
        Param("mlp.experts.local_experts.{expert}.linear_fc1.weight",
              ("block_sparse_moe.experts.{expert}.w1.weight", "block_sparse_moe.experts.{expert}.w3.weight"),
              GATE_UP),
        Param("mlp.experts.local_experts.{expert}.linear_fc2.weight",
              ("block_sparse_moe.experts.{expert}.w2.weight",), ROW),
    ),
    global_params=GLOBAL_PARAMS,
    sliding_window=True,
    moe=MoE(num_experts_keys=("num_local_experts",), expert_ffn_key="intermediate_size"),
    # Router jitter multiplies the router input by noise in training: not built.
    required_values={"hidden_act": "silu", "router_jitter_noise": 0.0},
    hf_architecture="MixtralForCausalLM",
)
