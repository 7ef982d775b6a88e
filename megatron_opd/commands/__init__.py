"""The subcommands of ``megatron-opd``: from parsed arguments to an exit code."""
