"""init_from: a new run starts from an earlier run's final weights, exactly, whether init_from names
the run directory, its checkpoint, an `ndino export` folder (sharded, original LLaVA-NeXT layout) or
a transformers `save_pretrained` folder; bad paths and other models fail with clear errors; a
checkpoint in output_dir (resume) wins over init_from."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ndino.cli import main
from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import latest_checkpoint, load_model_weights
from llava_ndino.model.loading import load_trained
from llava_ndino.train.loop import train
from llava_ndino.train.tasks.registry import make_task

ARGS = [
    "recipe=demo",
    "model.tiny.hidden_size=64",
    "data.synthetic.train=16",
    "train.per_device_batch_size=2",
    "train.log_every=1",
    "train.cpu_threads=1",
]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """Run A: 2 steps at a high learning rate, so its weights are far from any fresh build."""
    run = tmp_path_factory.mktemp("a") / "run"
    train(load_config([*ARGS, "train.max_steps=2", "train.lr=1e-2", f"output_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def hf_folders(run_a, tmp_path_factory) -> dict[str, Path]:
    """Run A as an `ndino export` folder (in several shards) and as a transformers save_pretrained folder."""
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llava_ndino.export.vlm.SHARD_BYTES", 400_000)
        assert main(["export", str(run_a), "--out", str(root / "export")]) == 0
    assert len(list((root / "export").glob("model-*-of-*.safetensors"))) > 1
    model, _ = load_trained(run_a)
    model.save_pretrained(str(root / "save_pretrained"))
    return {"export": root / "export", "save_pretrained": root / "save_pretrained"}


def _build(output_dir: Path, *extra: str) -> torch.nn.Module:
    """Build run B's model as the loop would, before any training (seed 1: a different random init)."""
    task = make_task(load_config([*ARGS, "train.max_steps=1", "seed=1", f"output_dir={output_dir}", *extra]))
    task.build()
    return task.model


def _assert_equal_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("source", ["run", "checkpoint", "export", "save_pretrained"])
def test_init_from_gives_run_a_final_weights_exactly(run_a, hf_folders, tmp_path: Path, source: str) -> None:
    final = load_model_weights(latest_checkpoint(run_a))
    fresh = _build(tmp_path / "fresh").state_dict()
    matrices = [key for key, tensor in final.items() if tensor.ndim >= 2]
    assert all(not torch.equal(fresh[key], final[key]) for key in matrices), "B's own init differs from A"
    path = {"run": run_a, "checkpoint": latest_checkpoint(run_a), **hf_folders}[source]
    _assert_equal_state(_build(tmp_path / "b", f"init_from={path}"), final)


def test_training_from_init_from_starts_at_step_zero(run_a, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llava_ndino")
    run_b = tmp_path / "b"
    result = train(
        load_config([*ARGS, "train.max_steps=1", "train.lr=0", f"init_from={run_a}", f"output_dir={run_b}"])
    )
    assert result.step == 1, "optimizer, scheduler and step start fresh"
    assert re.search(r"init_from: loaded \d+ tensors .* from checkpoint .*step_2", caplog.text)
    # lr 0 leaves the weights as loaded: B's first checkpoint holds A's final weights
    b_state = load_file(str(latest_checkpoint(run_b) / "model.safetensors"))
    a_state = load_file(str(latest_checkpoint(run_a) / "model.safetensors"))
    assert b_state.keys() == a_state.keys()
    for key in a_state:
        torch.testing.assert_close(b_state[key], a_state[key], rtol=0, atol=0, msg=key)


def test_resume_wins_over_init_from(run_a, tmp_path: Path, caplog) -> None:
    run_b = tmp_path / "b"
    train(load_config([*ARGS, "train.max_steps=1", "seed=1", f"output_dir={run_b}"]))
    caplog.set_level(logging.INFO, logger="llava_ndino")
    model = _build(run_b, f"init_from={run_a}")
    assert "ignored: the run resumes from" in caplog.text
    _assert_equal_state(model, _build(tmp_path / "fresh").state_dict())
    final = load_model_weights(latest_checkpoint(run_a))
    _assert_equal_state(_build(run_b, f"init_from={run_a}", "resume=none"), final)


def test_bad_paths_name_the_path(run_a, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"init_from={re.escape(str(missing))} does not exist"):
        _build(tmp_path / "b", f"init_from={missing}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither a run directory .* nor an HF LlavaNext folder"):
        _build(tmp_path / "b", f"init_from={empty}")
    unsaved = tmp_path / "unsaved"
    (unsaved / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        _build(tmp_path / "b", f"init_from={unsaved}")


def test_another_model_is_a_clear_error(run_a, tmp_path: Path) -> None:
    extra_layer = r"do not match .* unexpected \(e\.g\. \['model\.language_model\.layers\.2\."
    with pytest.raises(ValueError, match=rf"init_from={re.escape(str(run_a))}: .*{extra_layer}"):
        _build(tmp_path / "b", f"init_from={run_a}", "model.tiny.layers=2")
    narrower = r"shape mismatch for model\.image_newline: \[64\] in the weights, \[32\] in the model"
    with pytest.raises(ValueError, match=narrower):
        _build(tmp_path / "b", f"init_from={run_a}", "model.tiny.hidden_size=32")
