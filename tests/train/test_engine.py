"""Engine selection, batch resolution and DeepSpeed configs (one process, no torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.train.engine import (
    DS_CONFIG_DIR,
    ZERO_ENGINES,
    check_resumable,
    deepspeed_config,
    engine_name,
    resolve_batch,
)
from llava_ndino.train.loop import train

TINY = [
    "recipe=demo",
    "train.max_steps=2",
    "train.save_every=2",
    "train.per_device_batch_size=2",
    "data.synthetic.train=16",
    "model.tiny.hidden_size=64",
    "train.cpu_threads=1",
]


@pytest.mark.parametrize(
    ("per_device", "accum", "global_batch", "world", "expected"),
    [
        (4, 2, 0, 8, (4, 2)),  # nothing fixed: the global batch grows with the world
        (2, 8, 128, 8, (2, 8)),  # fixed global batch, accumulation derived
        (2, 8, 128, 1, (2, 64)),
        (2, 8, 128, 64, (2, 1)),
        (16, 1, 16, 2, (8, 1)),  # the world alone exceeds it: smaller per-device batch
        (2, 1, 16, 32, None),  # 16 samples over 32 processes
        (3, 1, 16, 2, None),  # 8 per process is no multiple of 3
    ],
)
def test_resolve_batch(per_device, accum, global_batch, world, expected) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="global_batch_size=16"):
            resolve_batch(per_device, accum, global_batch, world)
    else:
        assert resolve_batch(per_device, accum, global_batch, world) == expected
        got_per_device, got_accum = expected
        if global_batch:
            assert got_per_device * got_accum * world == global_batch


@pytest.mark.parametrize("name", ZERO_ENGINES)
def test_shipped_deepspeed_configs_fill_auto_values(name: str) -> None:
    assert (Path("launch/deepspeed") / f"{name}.json").resolve() == (DS_CONFIG_DIR / f"{name}.json").resolve()
    config = deepspeed_config(name, None, micro_batch=4, grad_accum=3, max_grad_norm=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is False  # no CUDA here
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if name.startswith("zero3") else 2)
    assert ("offload_optimizer" in zero) == name.endswith("offload")
    assert ("offload_param" in zero) == (name == "zero3_offload")
    assert "auto" not in json.dumps(config)


def test_bad_deepspeed_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 1}}')
    with pytest.raises(ValueError, match=f"{bad}: zero_optimization.stage must be 2 or 3"):
        deepspeed_config("zero2", str(bad), 1, 1, 1.0)
    with pytest.raises(ValueError, match="cannot read DeepSpeed config"):
        deepspeed_config("zero2", str(tmp_path / "missing.json"), 1, 1, 1.0)


def test_engine_name_follows_the_world_size() -> None:
    assert engine_name("single", 4) == "ddp" and engine_name("ddp", 1) == "single"
    assert engine_name("zero3", 1) == "zero3" and engine_name("single", 1) == "single"


def test_unknown_engine_names_the_choices() -> None:
    with pytest.raises(ValueError, match="zero3_offload"):
        load_config([*TINY, "output_dir=unused", "engine=zero4"])


@pytest.mark.parametrize(
    ("saved", "current", "allowed"),
    [
        (("zero3", 2), ("zero3", 2), True),
        (("zero3", 2), ("zero3", 4), False),  # shards are per rank
        (("zero2", 1), ("zero3", 1), False),
        (("zero2", 2), ("ddp", 2), False),  # no optimizer.pt in a ZeRO checkpoint
        (("single", 1), ("ddp", 4), True),  # full state: any world size
        ((None, None), ("single", 1), True),  # written before engines were recorded
        ((None, None), ("zero2", 1), False),
    ],
)
def test_check_resumable(saved, current, allowed) -> None:
    if allowed:
        check_resumable(Path("ckpt"), saved, current)
    else:
        with pytest.raises(ValueError, match=r"same engine and process count.*init_from=ckpt"):
            check_resumable(Path("ckpt"), saved, current)


def test_zero_shards_resume_only_with_their_engine(tmp_path: Path) -> None:
    """One process under ZeRO-2 writes shards; resuming them as ZeRO-3 or single is refused before
    anything is built (ZeRO-3's engine would patch torch.nn.functional.linear in this process)."""
    run_dir = tmp_path / "run"
    assert train(load_config([*TINY, "engine=zero2", f"output_dir={run_dir}"])).status == "completed"
    checkpoint = run_dir / "checkpoints" / "step_2"
    assert (checkpoint / "zero").is_dir() and (checkpoint / "model.safetensors").is_file()
    for engine in ("zero3", "single"):
        more = [*TINY, f"engine={engine}", "train.max_steps=4", f"output_dir={run_dir}"]
        with pytest.raises(ValueError, match=rf"zero2 on 1 processes.*{engine} on 1.*init_from="):
            train(load_config(more))
