"""The CPU demo (`make demo`): train a tiny VLM on synthetic shapes, score it, export it, ask it."""
