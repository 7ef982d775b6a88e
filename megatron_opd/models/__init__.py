"""HF architectures as megatron-core models: family tables, config mapping, model building."""

from megatron_opd.models.builder import ShardedModel, build_model
from megatron_opd.models.config import ArchConfig, padded_vocab_size
from megatron_opd.models.families import FAMILIES

__all__ = ["FAMILIES", "ArchConfig", "ShardedModel", "build_model", "padded_vocab_size"]
