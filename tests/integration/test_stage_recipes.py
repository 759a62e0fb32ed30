"""The NDiNO stage recipes (align, adapt, short_it, long_it) train on tiny models and chain through
init_from: from the component folders, and from an existing LlavaNext folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llava_ndino.config import load_config
from llava_ndino.train.loop import train
from tests.helpers import TINY_STAGE

STAGES = ["align", "adapt", "short_it", "long_it"]

TINY = [*TINY_STAGE, "train.log_every=1"]


def _last_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"]


def _train_stage(stage: str, run_dir: Path, *extra: str) -> None:
    result = train(load_config([f"recipe={stage}", *TINY, f"output_dir={run_dir}", *extra]))
    assert (result.status, result.step) == ("completed", 2)
    assert math.isfinite(_last_loss(run_dir)) and _last_loss(run_dir) > 0


def test_stages_chain_through_init_from(tiny_dirs, tmp_path: Path) -> None:
    """pt_short_long on tiny folders: align -> adapt -> short_it -> long_it, each from the last."""
    models = [f"model.vision={tiny_dirs['vision']}", f"model.llm={tiny_dirs['llm']}"]
    previous = "null"
    for stage in STAGES:
        _train_stage(stage, tmp_path / stage, *models, f"init_from={previous}")
        log = (tmp_path / stage / "train.log").read_text()
        assert ("init_from: loaded" in log) == (previous != "null"), stage
        previous = str(tmp_path / stage)


def test_stages_from_an_existing_lmm(tiny_llava_dir, tmp_path: Path) -> None:
    """short_long: short_it from an HF LlavaNext folder (model.source=llava), then long_it from that run."""
    start = ["model.source=llava", f"model.llava={tiny_llava_dir}"]
    _train_stage("short_it", tmp_path / "short_it", *start, "init_from=null")
    _train_stage("long_it", tmp_path / "long_it", *start, f"init_from={tmp_path / 'short_it'}")
