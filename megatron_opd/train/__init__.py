"""The OPD trainer: data and packing, rollouts, teacher phase, objective, loop, checkpoints, logs."""
