"""Mistral family: Llama's table; its optional sliding window maps to megatron's window_size."""

from megatron_opd.models.family import Family
from megatron_opd.models.llama import GLOBAL_PARAMS, LAYER_PARAMS

MISTRAL = Family(
    model_type="mistral",
    layer_params=LAYER_PARAMS,
    global_params=GLOBAL_PARAMS,
    sliding_window=True,
    required_values={"hidden_act": "silu"},
    hf_architecture="MistralForCausalLM",
)
