"""The teacher: in process (a megatron model on its own groups) or served over HTTP, one protocol."""
