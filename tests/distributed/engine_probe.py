"""Run under ``torchrun --nproc_per_node 2`` by test_engines.py: checks one engine from the inside.

Usage: ``engine_probe.py ENGINE OUT_DIR``. Rank 0 trains on micro-batches with images while rank 1
trains on text-only micro-batches (the mix that hangs ZeRO-3 when a rank skips the vision tower),
for a few steps. Each rank then writes ``OUT_DIR/rank{R}.json`` with its rank, the world size, a
checksum of every full parameter (gathered under ZeRO-3), which parameters it holds only a part of,
and the losses it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import logger as ds_logger

from llava_ndino.config import load_config
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.synthetic.shapes import make_dialogue
from llava_ndino.train.engine import ZERO_ENGINES, deepspeed_config, init_distributed, make_engine
from llava_ndino.train.optim import make_optimizer
from llava_ndino.train.tasks.registry import make_task

STEPS = 3


def _batch(task, rank: int, step: int) -> dict[str, torch.Tensor]:
    """Two samples: shapes dialogues with images on rank 0, text-only chats on rank 1."""
    encoder = ConversationEncoder(task.processor, "llama3", 2048, None)
    samples = []
    for i in range(2):
        if rank == 0:
            record, image = make_dialogue(step * 2 + i, seed=7, width=112, height=112)
            samples.append(encoder.encode(record, images=[image]))
        else:
            record = {
                "id": f"text-{step}-{i}",
                "conversations": [
                    {"from": "human", "value": f"Quante forme ci sono? Rispondi {i}."},
                    {"from": "gpt", "value": "due" if i else "una"},
                ],
            }
            samples.append(encoder.encode(record))
    return task.collator()(samples).tensors


def _full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter in full (gathered on all ranks under ZeRO-3)."""
    import deepspeed

    full = {}
    for name, param in engine.model.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full[name] = param.detach().clone()
        else:
            full[name] = param.detach().clone()
    return full


def main(name: str, out: Path) -> None:
    ds_logger.setLevel("WARNING")
    rank, _, world_size = init_distributed()
    torch.set_num_threads(1)
    cfg = load_config(
        [
            "recipe=demo",
            f"output_dir={out}",
            "model.tiny.hidden_size=64",
            f"engine={name}",
            "train.max_steps=3",
        ]
    )
    task = make_task(cfg)
    task.build()
    task.prepare_parallel(world_size)
    optimizer = make_optimizer("adamw", task.param_groups())
    config = deepspeed_config(name, None, 2, 1, 1.0) if name in ZERO_ENGINES else None
    engine = make_engine(name, task.model, optimizer, torch.device("cpu"), world_size, config)
    engine.model.train()
    losses = []
    for step in range(STEPS):
        batch = _batch(task, rank, step)
        targets = engine.all_reduce_sum(task.targets(batch))
        with engine.micro_context(last=True):
            loss_sum, _ = task.loss_sum(engine.module, batch)
            engine.backward(loss_sum * world_size / targets)
        engine.clip_and_step(1.0)
        losses.append(float(loss_sum) / max(task.targets(batch), 1))
    partitioned = [
        name
        for name, param in engine.model.named_parameters()
        if hasattr(param, "ds_tensor") and param.ds_tensor.numel() < param.ds_numel
    ]
    checksums = {key: float(value.double().abs().sum()) for key, value in _full_parameters(engine).items()}
    result = {
        "rank": rank,
        "world_size": world_size,
        "partitioned": partitioned,
        "numel": {
            name: int(getattr(p, "ds_numel", p.numel())) for name, p in engine.model.named_parameters()
        },
        "checksums": checksums,
        "losses": losses,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    engine.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
