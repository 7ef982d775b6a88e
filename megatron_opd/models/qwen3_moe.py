"""Qwen3-MoE family: Qwen3's attention (q/k norms) and, in every layer, a router over SwiGLU
experts (no shared expert); the top-k probabilities are renormalised when config.norm_topk_prob."""

from megatron_opd.models.family import GATE_UP, REPLICATED, ROW, Family, MoE, Param
from megatron_opd.models.llama import ATTENTION_PARAMS, GLOBAL_PARAMS
from megatron_opd.models.qwen3 import QK_NORM_PARAMS

QWEN3_MOE = Family(
    model_type="qwen3_moe",
    layer_params=ATTENTION_PARAMS + QK_NORM_PARAMS + (
        Param("mlp.router.weight", ("mlp.gate.weight",), REPLICATED),
        Param("mlp.experts.local_experts.{expert}.linear_fc1.weight",
              ("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"), GATE_UP),
        Param("mlp.experts.local_experts.{expert}.linear_fc2.weight",
              ("mlp.experts.{expert}.down_proj.weight",), ROW),
    ),
    global_params=GLOBAL_PARAMS,
    qk_norm=True,
    moe=MoE(num_experts_keys=("num_experts", "num_local_experts"), expert_ffn_key="moe_intermediate_size",
            renormalize_key="norm_topk_prob"),
    # Every layer sparse: no dense MLP layers in between.
    required_values={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
                     "decoder_sparse_step": 1, "mlp_only_layers": []},
    hf_architecture="Qwen3MoeForCausalLM",
)
