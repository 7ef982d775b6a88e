"""HF architectures as megatron-core models: family tables, config mapping, model building."""

from megatron_opd.models.family import Family
from megatron_opd.models.llama import LLAMA
from megatron_opd.models.mistral import MISTRAL
from megatron_opd.models.mixtral import MIXTRAL
from megatron_opd.models.qwen2 import QWEN2
from megatron_opd.models.qwen3 import QWEN3
from megatron_opd.models.qwen3_moe import QWEN3_MOE

# Chosen by the exact HF `config.model_type`.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, QWEN3_MOE, MIXTRAL)}

from megatron_opd.models.config import ArchConfig, padded_vocab_size  # noqa: E402
from megatron_opd.models.builder import ShardedModel, build_model  # noqa: E402

__all__ = ["FAMILIES", "ArchConfig", "ShardedModel", "build_model", "padded_vocab_size"]
