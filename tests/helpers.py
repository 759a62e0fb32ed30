"""Small builders several test modules share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_ndino.train.checkpoint import save_checkpoint

TINY_DEMO = ["recipe=demo", "output_dir=unused", "model.tiny.hidden_size=64", "data.synthetic.image_size=112"]
"""The demo recipe with a narrower language model and the smallest anyres images: fast CPU tests."""


TINY_STAGE = [
    "engine=single",
    "train.global_batch_size=0",
    "model.dtype=float32",
    "data.mixture=null",
    "data.synthetic.kind=shapes",
    "data.synthetic.train=8",
    "data.synthetic.image_size=112",
    "data.num_workers=0",
    "train.per_device_batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=2",
    "train.cpu_threads=1",
]
"""What a CPU run adds to a LLaVA-NDiNO stage recipe besides the model folders: 2 tiny steps on shapes."""
TEXT_TEMPLATES = ("llama2-it-chat", "alpaca-it", "llama3-anita")
"""The templates of the text-only recipes besides LLaVA-NDiNO's llama3."""
LEGAL_CHAT = [
    {"role": "system", "content": "Sei un esperto di diritto."},
    {"role": "user", "content": "Che cos'è un decreto?"},
    {"role": "assistant", "content": "Un atto del governo."},
    {"role": "user", "content": "E una legge?"},
    {"role": "assistant", "content": "Un atto del parlamento."},
]
"""A two-turn chat with a system prompt, in the OpenAI messages schema."""


def save_tiny_checkpoint(run_dir: Path, step: int, keep_last: int = 10, value: float = 0.0) -> Path:
    """Save a tiny checkpoint whose single tensor is filled with ``value``."""
    return save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.full((3,), value)},
        optimizer_state=None,
        scheduler_state=None,
        trainer_state={"epoch": 0},
        config_text="seed: 0\n",
        keep_last=keep_last,
    )
