"""Training on Ray Train: data, loop, validation, checkpoints, outputs."""
