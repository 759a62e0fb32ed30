"""Typed run configuration: recipe loading and command-line overrides over the schema of
:mod:`llava_ndino.config.schema`, validated by :mod:`llava_ndino.config.rules`.

A run is described by a :class:`RunConfig`. :func:`load_config` builds one from command-line
tokens: the schema defaults, then the recipe YAML named by ``recipe=``, then ``dotted.key=value``
overrides. OmegaConf structured configs coerce the values to the declared types; this module adds
clear errors for unknown keys (naming the closest valid key), enumerated values and missing
required values. Every error is a :class:`RecipeError`.

The string literal under each schema field is its documentation: :func:`describe_config` reads it
back from the schema's source with :mod:`ast`, so it is written only once.
"""

import ast
import difflib
import json
from dataclasses import Field, fields, is_dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llava_ndino.config.rules import CHOICES, upgrade_legacy_keys, validate
from llava_ndino.config.schema import (
    ATTENTION,
    DTYPES,
    ENGINES,
    DataConfig,
    DpoConfig,
    LoraConfig,
    ModelConfig,
    RecipeError,
    RunConfig,
    SyntheticConfig,
    TinyConfig,
    TrainConfig,
)
from llava_ndino.formats.run_dir import CONFIG_FILE


def recipes_dir() -> Path:
    """Return the folder of shipped recipes (``llava_ndino/recipes``; the repo's ``recipes/`` links here)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[tuple[str, str]]:
    """Return ``(name, description)`` of every shipped recipe, sorted by name."""
    paths = sorted(recipes_dir().glob("*.yaml"))
    return [(path.stem, str(_read_yaml(path).get("description", ""))) for path in paths]


def load_config(args: list[str]) -> RunConfig:
    """Build a validated :class:`RunConfig` from ``key=value`` tokens, one of them ``recipe=``.

    ``recipe=`` names a shipped recipe or a YAML file. Values merge as schema defaults, then the
    recipe, then the other tokens in order; dotted keys reach into sections, and values are parsed
    as YAML (``[a,b]`` is a list, ``null`` is None). Raises :class:`RecipeError` on any problem.
    """
    recipe = ""
    overrides: list[tuple[str, str]] = []
    for token in args:
        key, sep, value = token.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(
                f"expected key=value, got {token!r}: set values as dotted.key=value, "
                "e.g. train.max_steps=100 train.trainable=[projector,llm] model.vision=null"
            )
        if key == "recipe":
            recipe = value.strip()
        else:
            overrides.append((key, value))
    if not recipe:
        raise RecipeError(f"no recipe given: add recipe=NAME or recipe=path/to/file.yaml\n{_available()}")
    path = _recipe_path(recipe)
    cfg = OmegaConf.structured(RunConfig(recipe=recipe))
    recipe_values = _read_yaml(path)
    _check_keys(recipe_values, f"in {path}")
    cfg = _merge(cfg, recipe_values, f"in {path}")
    for key, value in overrides:
        where = f"in override '{key}={value}'"
        _check_key(key, where)
        try:
            update = OmegaConf.from_dotlist([f"{key}={value}"])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise RecipeError(f"cannot parse the value {where}: {_first_line(err)}") from None
        cfg = _merge(cfg, update, where)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        run = None if missing else OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise RecipeError(f"cannot resolve '{getattr(err, 'full_key', '')}': {_first_line(err)}") from None
    if not isinstance(run, RunConfig):
        needed = " ".join(f"{key}=..." for key in missing)
        raise RecipeError(
            f"missing required value(s): add {needed} to the command line or set them in {path}"
        )
    validate(run, frozenset(key for key, _ in overrides))
    return run


def config_to_yaml(cfg: RunConfig) -> str:
    """Return ``cfg`` as YAML text with every key set, loadable again with ``recipe=FILE``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the fully resolved ``cfg`` to ``run_dir/config.yaml`` and return that path."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    return path


def describe_config() -> str:
    """Return a help text listing every key with its type, default, allowed values and docstring."""
    lines = ["Configuration keys (set with key=value; dotted keys reach into sections):", ""]
    for key, (annotation, doc, spec) in _schema().items():
        if is_dataclass(spec.type):
            lines += ["", f"{key}: {doc}"]
            continue
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        shown = "(required)" if default is MISSING else json.dumps(default)
        choices = f"  [{'|'.join(CHOICES[key])}]" if key in CHOICES else ""
        lines += [f"  {key}: {annotation} = {shown}{choices}", f"      {doc}"]
    return "\n".join(lines)


@cache
def _schema() -> dict[str, tuple[str, str, Field]]:
    """Map every dotted key of :class:`RunConfig`, sections included, to (annotation, docstring, field).

    Annotations and docstrings are parsed from this module's source; keys come in declaration order.
    """
    docs: dict[tuple[str, str], tuple[str, str]] = {}
    for node in ast.parse((Path(__file__).parent / "schema.py").read_text(encoding="utf-8")).body:
        for stmt, after in pairwise(node.body if isinstance(node, ast.ClassDef) else []):
            if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr):
                doc = " ".join(str(ast.literal_eval(after.value)).split())
                docs[node.name, ast.unparse(stmt.target)] = (ast.unparse(stmt.annotation), doc)
    schema: dict[str, tuple[str, str, Field]] = {}

    def walk(cls: type, prefix: str) -> None:
        for spec in fields(cls):
            schema[prefix + spec.name] = (*docs[cls.__name__, spec.name], spec)
            if is_dataclass(spec.type):
                walk(spec.type, f"{prefix}{spec.name}.")

    walk(RunConfig, "")
    return schema


def _available() -> str:
    """Return a listing of the shipped recipes for error messages."""
    rows = [f"  {name:<16} {description}" for name, description in list_recipes()]
    return "available recipes:\n" + "\n".join(rows) if rows else f"no recipes found in {recipes_dir()}"


def _recipe_path(recipe: str) -> Path:
    """Resolve ``recipe`` (a shipped recipe's name, or a YAML file path) to an existing file."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return path
    named = recipes_dir() / f"{recipe}.yaml"
    if not named.is_file():
        raise RecipeError(f"unknown recipe {recipe!r}\n{_available()}")
    return named


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read the recipe YAML at ``path`` as a plain mapping (interpolations left unresolved)."""
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, not a {type(values).__name__}")
    return upgrade_legacy_keys(values)


def _check_key(key: str, where: str) -> None:
    """Raise :class:`RecipeError` naming the closest valid key when dotted ``key`` is not in the schema."""
    if key in _schema():
        return
    leaves = [name for name, (_, _, spec) in _schema().items() if not is_dataclass(spec.type)]
    match = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
    if not match:  # compare last components, so that e.g. `lr` finds `train.lr`
        tails = {leaf.rsplit(".", 1)[-1]: leaf for leaf in leaves}
        match = [tails[t] for t in difflib.get_close_matches(key.rsplit(".", 1)[-1], tails, n=1, cutoff=0.6)]
    hint = f" (did you mean '{match[0]}'?)" if match else " (run `ndino train --help` to list the keys)"
    raise RecipeError(f"unknown key '{key}' {where}{hint}")


def _check_keys(values: dict[str, Any], where: str, prefix: str = "") -> None:
    """Check every key of the nested mapping ``values`` (at dotted ``prefix``) with :func:`_check_key`."""
    for name, value in values.items():
        key = f"{prefix}{name}"
        _check_key(key, where)
        if isinstance(value, dict) and is_dataclass(_schema()[key][2].type):
            _check_keys(value, where, f"{key}.")


def _merge(cfg: DictConfig, update: Any, where: str) -> DictConfig:
    """Merge ``update`` into ``cfg``, turning OmegaConf type errors into :class:`RecipeError`."""
    try:
        merged = OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        expected = f" (expected {_schema()[key][0]})" if key in _schema() else ""
        for_key = f" for '{key}'" if key else ""
        raise RecipeError(f"invalid value{for_key} {where}: {_first_line(err)}{expected}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _first_line(err: Exception) -> str:
    """Return the first line of ``err``'s message (OmegaConf appends key and type details)."""
    return str(err).strip().split("\n", 1)[0]


__all__ = [
    "ATTENTION",
    "DTYPES",
    "ENGINES",
    "DataConfig",
    "DpoConfig",
    "LoraConfig",
    "ModelConfig",
    "RecipeError",
    "RunConfig",
    "SyntheticConfig",
    "TinyConfig",
    "TrainConfig",
    "config_to_yaml",
    "describe_config",
    "list_recipes",
    "load_config",
    "save_resolved_config",
    "upgrade_legacy_keys",
]
