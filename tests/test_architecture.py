"""The floor plan of ``docs/design.md`` holds: imports run one way (down the floors), no module is part
of an import cycle, and the apps load models through ``model/``, never through ``train/``.

Every import counts, including those inside functions (deferred imports are still dependencies).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llava_ndino"

FLOORS: dict[str, int] = {
    "formats": 0,
    "config": 1,
    "model": 2,
    "data": 3,
    "synthetic": 4,
    "train": 5,
    "infer": 6,
    "export": 6,
    "demo": 6,
    "plan": 6,
    "prep": 6,
    "chain": 6,
    "cli": 7,
}
"""Room (first component under ``llava_ndino``) -> floor; a module imports only its floor or lower."""

APP_TRAIN_IMPORTS: dict[str, set[str]] = {
    "demo": {"train.loop", "train.data_factory"},  # the demo trains, then reads its eval split
    "plan": {"train.engine", "train.losses"},  # the planner models the engines' and the loss's memory
    "chain": {"train.loop"},  # the chain trains each stage; models load through model/ inside the loop
}
"""The only ``train/`` modules an app may import; model building and loading come from ``model/``."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Package modules that ``path`` imports (relative imports resolved; ``from pkg import mod`` kept as pkg.mod)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llava_ndino")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(
                    ["llava_ndino", *[p for p in base if p], *([node.module] if node.module else [])]
                )
            else:
                target = node.module or ""
            if target.startswith("llava_ndino"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = _all_modules()
    return {
        name.removeprefix("llava_ndino.") for name in found if name.removeprefix("llava_ndino.") in modules
    }


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path, name) - {name} for name, path in _all_modules().items() if name}


def _room(module: str) -> str:
    return module.split(".", 1)[0]


def test_every_room_has_a_floor() -> None:
    rooms = {_room(name) for name in _all_modules() if name}
    assert rooms <= FLOORS.keys(), (
        f"rooms without a floor in docs/design.md and FLOORS: {rooms - FLOORS.keys()}"
    )


def test_no_import_runs_upward() -> None:
    upward = [
        f"{module} (floor {FLOORS[_room(module)]}) imports {target} (floor {FLOORS[_room(target)]})"
        for module, targets in _graph().items()
        for target in targets
        if FLOORS[_room(target)] > FLOORS[_room(module)]
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("app", sorted(room for room, floor in FLOORS.items() if floor == 6))
def test_apps_load_models_through_model_not_train(app: str) -> None:
    allowed = APP_TRAIN_IMPORTS.get(app, set())
    used = {t for m, ts in _graph().items() if _room(m) == app for t in ts if _room(t) == "train"}
    assert used <= allowed, f"{app} imports {sorted(used - allowed)} from train/"


def test_the_checker_sees_a_planted_upward_import_and_cycle(tmp_path: Path, monkeypatch) -> None:
    """Guard against a checker that passes vacuously: an upward import and a cycle planted in a copy."""
    fake = tmp_path / "llava_ndino"
    (fake / "formats").mkdir(parents=True)
    (fake / "formats" / "__init__.py").write_text("")
    (fake / "formats" / "a.py").write_text("from llava_ndino.config import X\n")
    (fake / "config.py").write_text("from llava_ndino.formats.a import Y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["formats.a"] == {"config"} and graph["config"] == {"formats.a"}
    with pytest.raises(AssertionError):
        test_no_import_runs_upward()
    with pytest.raises(AssertionError):
        test_no_import_cycle()
