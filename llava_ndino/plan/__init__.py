"""The planner: per-GPU memory of a recipe under every engine, before launch (`ndino plan`)."""
