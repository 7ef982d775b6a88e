"""The supported architecture families, chosen by the exact HF ``config.model_type``."""

from megatron_opd.models.family import Family
from megatron_opd.models.llama import LLAMA
from megatron_opd.models.mistral import MISTRAL
from megatron_opd.models.mixtral import MIXTRAL
from megatron_opd.models.qwen2 import QWEN2
from megatron_opd.models.qwen3 import QWEN3
from megatron_opd.models.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, QWEN3_MOE, MIXTRAL)}
