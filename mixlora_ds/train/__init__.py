"""Training with DeepSpeed: run config, plan, model build, loop, checkpoints, export, monitoring."""
