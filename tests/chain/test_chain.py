"""``ndino chain``: the seven released LLaVA-NDiNO chains (stages, folders, init_from links), and a real
tiny chain (short_long: align -> short_it -> long_it) whose every stage starts from the previous
stage's trained weights, and which skips its complete stages when run again."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from llava_ndino.chain import CHAINS, run_chain
from llava_ndino.cli import main
from llava_ndino.formats.run_dir import load_model_weights
from tests.helpers import TINY_STAGE

EXPECTED = {  # release -> (run, recipe, run it starts from), from docs/design.md#released-llava-ndino-checkpoints
    "pt": [("align", "align", None), ("pt", "adapt", "align")],
    "pt_short_it": [("align", "align", None), ("pt", "adapt", "align"), ("pt_short_it", "short_it", "pt")],
    "pt_long": [("align", "align", None), ("pt", "adapt", "align"), ("pt_long", "long_it", "pt")],
    "pt_short_long": [
        ("align", "align", None),
        ("pt", "adapt", "align"),
        ("pt_short_it", "short_it", "pt"),
        ("pt_short_long", "long_it", "pt_short_it"),
    ],
    "short_it": [("align", "align", None), ("short_it", "short_it", "align")],
    "long": [("align", "align", None), ("long", "long_it", "align")],
    "short_long": [
        ("align", "align", None),
        ("short_it", "short_it", "align"),
        ("short_long", "long_it", "short_it"),
    ],
}

TINY = [
    *TINY_STAGE,
    # step 1 is the warmup step, whose learning rate is 0: the step_1 checkpoint holds a stage's
    # initial weights exactly, and step_2 its trained ones
    "train.warmup_ratio=0.5",
    "train.save_every=1",
    "train.keep_last=2",
]


def _stages(text: str) -> list[tuple[str, str, str | None]]:
    """(run, recipe, init_from run) of each stage printed by --dry-run, checked against its command."""
    found = []
    for block in re.split(r"\n(?=\[\d+/\d+\] )", text.split("\n", 1)[1]):
        run, recipe = re.match(r"\[\d+/\d+\] (\S+) \(recipe (\S+)\)", block).groups()
        output_dir = re.search(r"output_dir: (\S+)", block).group(1)
        link = re.search(r"init_from:  (\S+)", block).group(1)
        command = re.search(r"command:    (.+)", block).group(1)
        assert (
            command
            == f"ndino train recipe={recipe} output_dir={output_dir} init_from={link if link != 'none' else 'null'}"
        )
        parent = None if link == "none" else Path(link).name
        assert Path(output_dir).name == run
        found.append((run, recipe, parent))
    return found


@pytest.mark.parametrize("name", CHAINS)
def test_dry_run_prints_every_stage_and_runs_nothing(name: str, tmp_path: Path, capsys) -> None:
    assert main(["chain", name, "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert _stages(text) == EXPECTED[name]
    assert f"output_dir: {tmp_path / 'runs' / name}\n" in text
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_the_seven_releases_are_the_chains() -> None:
    assert sorted(CHAINS) == sorted(EXPECTED)


def test_dry_run_shows_a_launcher_and_overrides(tmp_path: Path, capsys) -> None:
    launcher = "torchrun --nproc-per-node 4 launch/train.py"
    args = ["chain", "pt", "--runs-dir", "r", "--dry-run", "--launcher", launcher, "train.lr=2e-5"]
    assert main(args) == 0
    assert f"command:    {launcher} recipe=adapt output_dir=r/pt init_from=r/align train.lr=2e-5" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("override", ["init_from=x", "output_dir=x", "recipe=demo"])
def test_the_chain_keys_cannot_be_overridden(override: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the chain sets"):
        run_chain("pt", tmp_path, [override], dry_run=True)


def test_a_bad_override_fails_before_any_stage_trains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.max_step"):
        run_chain("short_long", tmp_path, ["train.max_step=2"])
    assert not tmp_path.joinpath("align").exists()


def _loaded_from(run_dir: Path) -> Path:
    """The checkpoint a run's train.log says init_from loaded."""
    found = re.findall(
        r"init_from: loaded \d+ tensors .* from checkpoint (\S+)", (run_dir / "train.log").read_text()
    )
    assert len(found) == 1, found
    return Path(found[0])


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_model_weights(run_dir / "checkpoints" / f"step_{step}")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if prefix in k)


def test_short_long_chain_trains_each_stage_from_the_last(tiny_dirs, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    overrides = [*TINY, f"model.vision={tiny_dirs['vision']}", f"model.llm={tiny_dirs['llm']}"]
    lines: list[str] = []
    assert run_chain("short_long", runs, overrides, echo=lines.append) == 0
    assert lines[-1] == f"chain short_long complete: {runs / 'short_long'}"
    align, short_it, long_it = runs / "align", runs / "short_it", runs / "short_long"
    for run in (align, short_it, long_it):
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"

    # align trained the projector from the recipe's base models
    assert "init_from: loaded" not in (align / "train.log").read_text()
    assert _moved(_weights(align, 1), _weights(align, 2), "multi_modal_projector")
    # short_it started from align's final weights: its step-1 (lr 0) weights are exactly align's step 2
    assert _loaded_from(short_it) == align / "checkpoints" / "step_2"
    assert _same(_weights(short_it, 1), _weights(align, 2))
    assert _moved(_weights(short_it, 1), _weights(short_it, 2), "language_model")
    # long_it (run short_long) started from short_it's final weights, which moved the LLM align froze
    assert _loaded_from(long_it) == short_it / "checkpoints" / "step_2"
    assert _same(_weights(long_it, 1), _weights(short_it, 2))
    assert not _same(_weights(long_it, 1), _weights(align, 2))

    # again: every stage is complete, so nothing trains and nothing in the run folders changes
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    lines.clear()
    assert run_chain("short_long", runs, overrides, echo=lines.append) == 0
    assert [line for line in lines if line.endswith(", skipped")] == [
        "align: complete at step 2, skipped",
        "short_it: complete at step 2, skipped",
        "short_long: complete at step 2, skipped",
    ]
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before


def test_an_interrupted_stage_resumes_and_the_chain_goes_on(tiny_dirs, tmp_path: Path) -> None:
    """align stopped after step 1 of 2 (its step_2 removed, as a pre-emption before it would leave):
    the chain resumes it at step 1, then trains short_it from it."""
    runs = tmp_path / "runs"
    overrides = [*TINY, f"model.vision={tiny_dirs['vision']}", f"model.llm={tiny_dirs['llm']}"]
    run_chain("pt", runs, overrides, dry_run=True)  # validates; writes nothing
    from llava_ndino.config import load_config
    from llava_ndino.train.loop import train

    train(load_config(["recipe=align", f"output_dir={runs / 'align'}", "init_from=null", *overrides]))
    shutil.rmtree(runs / "align" / "checkpoints" / "step_2")
    (runs / "align" / "checkpoints" / "latest").write_text("step_1")
    lines: list[str] = []
    assert run_chain("short_it", runs, overrides, echo=lines.append) == 0
    assert "  state:      resumes at step 1 of 2" in lines
    assert "align: resuming into " + str(runs / "align") in lines
    assert "resumed from" in (runs / "align" / "train.log").read_text()
    assert lines[-1] == f"chain short_it complete: {runs / 'short_it'}"
