"""Data sets, processors and loaders for LLaVA-NDiNO training."""
