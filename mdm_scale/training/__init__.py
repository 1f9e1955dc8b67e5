"""Training: the DeepSpeed engine loop, learning-rate schedule, metrics and checkpoints."""
