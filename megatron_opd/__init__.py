"""megatron_opd: a megatron-core backend for on-policy distillation of large language models."""

__version__ = "0.1.0"
