"""Checkpoints: HF safetensors I/O and validation, megatron dist checkpoints, atomic publish."""
