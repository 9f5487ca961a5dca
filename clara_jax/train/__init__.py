"""Training: optimizer, train state, per-stage step functions, checkpoints and the loop."""
