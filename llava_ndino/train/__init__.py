"""Training loop, checkpointing and resume support."""
