"""Training: stage specs and parameter groups, the train loop, checkpoints and parallelism."""
