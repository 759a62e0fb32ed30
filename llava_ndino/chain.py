"""``ndino chain NAME``: train one released LLaVA-NDiNO combination, stage after stage.

Each stage is a stage recipe (align, adapt, short_it, long_it) trained into ``RUNS_DIR/<run>`` with
``init_from`` set to the run before it. :data:`RUNS` is the whole chain table: every run, its recipe
and the run it starts from; a release's chain is the path from ``align`` to the run of that name. Runs
that several releases share (``align``, ``pt``, ``short_it``, ``pt_short_it``) have one folder and are
trained once. A stage whose latest checkpoint reached its ``train.max_steps`` is skipped; one that
stopped early resumes (``resume=auto``). Sources: ``docs/design.md#released-llava-ndino-checkpoints``.
"""

from __future__ import annotations

import gc
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import CONFIG_FILE, TRAINER_STATE_FILE, latest_checkpoint, load_trainer_state

RUNS: dict[str, tuple[str, str | None]] = {
    # run (= output_dir name; a release name except align): (stage recipe, run it starts from)
    "align": ("align", None),  # projector on CLIP-L/336 + base Meta-Llama-3-8B (pretrain_clip.sh)
    "pt": ("adapt", "align"),  # LLaVA-NDiNO_pt: train_from_llm.sh (adapt-ita-llama)
    "pt_short_it": ("short_it", "pt"),  # card: LLaVA-NDiNO_pt tuned on the_cauldron_ita
    "pt_long": ("long_it", "pt"),  # card: LLaVA-NDiNO_pt tuned on conversation 58k (it)
    "pt_short_long": ("long_it", "pt_short_it"),  # card: LLaVA-NDiNO_pt_short tuned on conversation 58k
    "short_it": ("short_it", "align"),  # train_from_lmm.sh starts from ft-only-llama-ita
    "long": ("long_it", "align"),  # card: tuning LLaMA 3 8B Base and CLIP Large 336
    "short_long": ("long_it", "short_it"),  # train_from_lmm.sh: ft-only-llama-ita -> ft-long-llama-ita
}
"""The chain table: run name -> (stage recipe, the run whose weights it starts from; None: the recipe's
base models). The output folder of a run is ``RUNS_DIR/<run name>``."""

CHAINS: tuple[str, ...] = tuple(name for name in RUNS if name != "align")
"""The seven released combinations ``ndino chain`` trains (``swap-uniba/LLaVA-NDiNO_<name>``)."""

CHAIN_KEYS = ("recipe", "output_dir", "init_from")
"""Keys the chain sets for every stage, which an override may not change."""


@dataclass(frozen=True)
class Stage:
    """One stage of a chain: the run it trains, from which recipe, where, and from which weights."""

    name: str
    recipe: str
    output_dir: Path
    init_from: Path | None
    parent: str | None

    def tokens(self, overrides: list[str]) -> list[str]:
        """The ``ndino train`` arguments of this stage."""
        init = str(self.init_from) if self.init_from else "null"
        return [f"recipe={self.recipe}", f"output_dir={self.output_dir}", f"init_from={init}", *overrides]


@dataclass(frozen=True)
class Progress:
    """Where a stage's run directory stands: its latest checkpoint's step and the step it trains to."""

    step: int
    target: int | None

    @property
    def complete(self) -> bool:
        """The latest checkpoint reached the run's train.max_steps."""
        return self.target is not None and self.step >= self.target

    def describe(self) -> str:
        if self.complete:
            return f"complete (step {self.step}): skipped"
        if self.step == 0:
            return "not started"
        return f"resumes at step {self.step} of {self.target if self.target is not None else '?'}"


def plan_chain(name: str, runs_dir: Path) -> list[Stage]:
    """The stages of release ``name``, first to last, with their folders under ``runs_dir``."""
    if name not in CHAINS:
        raise ValueError(f"unknown chain {name!r}: pick one of {', '.join(CHAINS)}")
    stages: list[Stage] = []
    run: str | None = name
    while run is not None:
        recipe, parent = RUNS[run]
        init = Path(runs_dir) / parent if parent else None
        stages.append(Stage(run, recipe, Path(runs_dir) / run, init, parent))
        run = parent
    return stages[::-1]


def describe_chains() -> str:
    """One line per release: its stages as run names (recipe in brackets)."""
    lines = []
    for name in CHAINS:
        path = " -> ".join(f"{s.name} [{s.recipe}]" for s in plan_chain(name, Path(".")))
        lines.append(f"  {name:<14} {path}")
    return "\n".join(lines)


def progress(run_dir: Path) -> Progress:
    """How far the run in ``run_dir`` got: the latest complete checkpoint's step, and the step count it
    trains to (recorded by the loop, or the checkpoint's ``train.max_steps``)."""
    checkpoint = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if checkpoint is None:
        return Progress(0, None)
    step, state = load_trainer_state(checkpoint / TRAINER_STATE_FILE)
    target = state.get("max_steps")
    if target is None:  # checkpoints written before the loop recorded it
        config = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        target = (config.get("train") or {}).get("max_steps")
    return Progress(step, int(target) if target is not None else None)


def _check_overrides(overrides: list[str]) -> None:
    for token in overrides:
        key = token.partition("=")[0].strip()
        if key in CHAIN_KEYS:
            raise ValueError(
                f"{token!r}: the chain sets {', '.join(CHAIN_KEYS)} for every stage; pick the folders with "
                "--runs-dir, or train a single stage with `ndino train`"
            )


def run_chain(
    name: str,
    runs_dir: Path,
    overrides: list[str],
    dry_run: bool = False,
    launcher: str | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Train release ``name`` stage by stage (or, with ``dry_run``, print what would run).

    ``overrides`` apply to every stage. Stages run in this process, or as ``LAUNCHER ARGS...`` (e.g.
    ``torchrun --nproc-per-node 4 launch/train.py``) when ``launcher`` is given. Every stage's
    configuration is checked before the first one trains. Returns 0 when the chain is complete or a
    stage stopped early (pre-emption: run the chain again to resume); a failing stage raises.
    """
    _check_overrides(overrides)
    stages = plan_chain(name, runs_dir)
    configs = [load_config(stage.tokens(overrides)) for stage in stages]  # every mistake before hours of work
    prefix = shlex.split(launcher) if launcher else ["ndino", "train"]
    echo(f"chain {name}: {' -> '.join(s.name for s in stages)} (runs in {runs_dir})")
    for number, stage in enumerate(stages, 1):
        link = (
            f"{stage.init_from} (stage {stage.parent})"
            if stage.init_from
            else "none (the recipe's base models)"
        )
        echo(f"[{number}/{len(stages)}] {stage.name} (recipe {stage.recipe})")
        echo(f"  output_dir: {stage.output_dir}")
        echo(f"  init_from:  {link}")
        echo(f"  command:    {shlex.join([*prefix, *stage.tokens(overrides)])}")
        echo(f"  state:      {progress(stage.output_dir).describe()}")
    if dry_run:
        return 0
    for stage, cfg in zip(stages, configs, strict=True):
        before = progress(stage.output_dir)
        if before.complete:
            echo(f"{stage.name}: complete at step {before.step}, skipped")
            continue
        echo(f"{stage.name}: {'resuming' if before.step else 'training'} into {stage.output_dir}")
        if launcher:
            code = subprocess.run([*prefix, *stage.tokens(overrides)], check=False).returncode
            if code != 0:
                raise RuntimeError(f"stage {stage.name} exited with status {code}; the chain stops there")
        else:
            _train_here(cfg)
        after = progress(stage.output_dir)
        if not after.complete:
            echo(
                f"{stage.name} stopped at step {after.step} before its last step (pre-empted?): run "
                f"`ndino chain {name} --runs-dir {runs_dir}` again with the same overrides to resume"
            )
            return 0
        echo(f"{stage.name}: complete at step {after.step}")
    echo(f"chain {name} complete: {stages[-1].output_dir}")
    return 0


def _train_here(cfg) -> None:
    """Train one stage in this process, then drop its model before the next stage builds one."""
    from llava_ndino.train.loop import train

    train(cfg)
    gc.collect()
