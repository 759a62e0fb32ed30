"""What a valid run configuration is: allowed values, numeric bounds, keys that conflict or have no
effect, and the upgrade of keys written by earlier releases.
"""

from __future__ import annotations

import math
from dataclasses import fields
from operator import attrgetter
from typing import Any

from llava_ndino.config.schema import (
    ATTENTION,
    DTYPES,
    ENGINES,
    DpoConfig,
    LoraConfig,
    RecipeError,
    RunConfig,
    SyntheticConfig,
    TinyConfig,
    TrainConfig,
)
from llava_ndino.formats.prompts import TEMPLATES, TRAIN_ON

CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("components", "llava", "tiny", "causal_lm"),
    "objective": ("vlm_sft", "clm", "sft", "dpo"),
    "model.dtype": DTYPES,
    "model.attn_implementation": ATTENTION,
    "data.template": tuple(TEMPLATES),
    "data.train_on": TRAIN_ON,
    "engine": ENGINES,
    "data.synthetic.kind": ("shapes",),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.trainable": ("projector", "vision", "llm", "newline"),
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "lora.quantize": ("none", "4bit"),
    "data.control_tokens": ("skip", "escape"),
}
"""Allowed values of enumerated keys; a list key takes any of them, an optional key also null."""


RANGES: dict[str, str] = {
    "train.max_steps": "[1, inf)",
    "train.epochs": "(0, inf)",
    "train.per_device_batch_size": "[1, inf)",
    "train.grad_accum": "[1, inf)",
    "train.global_batch_size": "[0, inf)",
    "train.lr": "[0, inf)",
    "train.lr_vision": "[0, inf)",
    "train.lr_projector": "[0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.warmup_ratio": "[0, 1]",
    "train.max_grad_norm": "(0, inf)",
    "train.log_every": "[1, inf)",
    "train.save_every": "[1, inf)",
    "train.keep_last": "[0, inf)",
    "train.cpu_threads": "[0, inf)",
    "data.max_length": "[1, inf)",
    "data.num_workers": "[0, inf)",
    "data.max_skip_ratio": "[0, 1)",
    "data.max_pixels": "[1, inf)",
    "data.group_window": "[1, inf)",
    "data.pack_length": "[0, inf)",
    "data.shuffle_buffer": "[1, inf)",
    "data.synthetic.train": "[1, inf)",
    "data.synthetic.eval": "[1, inf)",
    "data.synthetic.image_size": "[1, inf)",
    "model.tiny.tile_size": "[1, inf)",
    "model.tiny.hidden_size": "[1, inf)",
    "model.tiny.layers": "[1, inf)",
    "model.tiny.vision_hidden_size": "[1, inf)",
    "model.tiny.vision_layers": "[2, inf)",
    "model.tiny.vocab_size": "[1, inf)",
    "lora.r": "[1, inf)",
    "lora.alpha": "(0, inf)",
    "lora.dropout": "[0, 1]",
    "dpo.beta": "(0, inf)",
    "dpo.max_prompt_length": "[1, inf)",
}
"""Allowed interval of each numeric key ("[" and "]" include the bound, "(" and ")" exclude it); every
float must also be finite, and an optional key may be null."""


def _in_interval(value: float, interval: str) -> bool:
    low_text, high_text = (part.strip() for part in interval[1:-1].split(","))
    low, high = float(low_text), float(high_text)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_ranges(cfg: RunConfig) -> None:
    for key, interval in RANGES.items():
        value = attrgetter(key)(cfg)
        if value is None:
            continue
        if not math.isfinite(value) or not _in_interval(value, interval):
            raise RecipeError(f"invalid value {value!r} for '{key}': must be a finite number in {interval}")


def _changed(section: Any, default: Any, keep: tuple[str, ...] = ()) -> list[str]:
    """Fields of dataclass ``section`` whose value differs from ``default``'s (``keep`` aside)."""
    return [
        f.name
        for f in fields(section)
        if f.name not in keep and getattr(section, f.name) != getattr(default, f.name)
    ]


_SOURCE_KEYS = {
    "components": ("vision", "llm", "projector"),
    "llava": ("llava",),
    "tiny": ("projector",),
    "causal_lm": ("llm",),
}
"""model.source -> the model.* path keys it reads; the others have no effect."""


def _ineffective(cfg: RunConfig) -> list[str]:
    """Keys set to something other than their default that the resolved configuration never reads."""
    found = [
        f"model.{k}"
        for k in ("vision", "llm", "llava", "projector")
        if getattr(cfg.model, k) and k not in _SOURCE_KEYS[cfg.model.source]
    ]
    if cfg.model.source != "tiny":
        found += [f"model.tiny.{k}" for k in _changed(cfg.model.tiny, TinyConfig())]
    if cfg.data.synthetic.kind is None:
        found += [f"data.synthetic.{k}" for k in _changed(cfg.data.synthetic, SyntheticConfig())]
    text = cfg.objective != "vlm_sft"
    if text and not cfg.lora.enabled:
        found += [f"lora.{k}" for k in _changed(cfg.lora, LoraConfig())]
    if cfg.objective != "dpo":
        found += [f"dpo.{k}" for k in _changed(cfg.dpo, DpoConfig())]
    if text:
        found += [
            f"train.{k}"
            for k in _changed(cfg.train, TrainConfig(max_steps=cfg.train.max_steps), keep=_TEXT_TRAIN_KEYS)
        ]
    return found


_TEXT_TRAIN_KEYS = tuple(
    f.name for f in fields(TrainConfig) if f.name not in ("trainable", "lr_vision", "lr_projector")
)
"""TrainConfig keys a text objective reads (it trains every weight, or the adapters)."""


def _check_conflicts(cfg: RunConfig, user_keys: frozenset[str]) -> None:
    """Raise for keys that contradict each other, and for keys the user set (``user_keys``, from the
    command line) that the resolved configuration never reads. A recipe's own alternatives (say, a
    model.llava path beside model.source=components) are left alone."""
    data = cfg.data
    sources = [
        name
        for name, on in (
            ("data.synthetic.kind", data.synthetic.kind),
            ("data.mixture", data.mixture),
            ("data.path", data.path),
        )
        if on
    ]
    if len(sources) > 1:
        raise RecipeError(
            f"{' and '.join(sources)} are both set, and only {sources[0]} would be read: set the other(s) "
            "to null (e.g. data.synthetic.kind=null to train on data.path with recipe=demo)"
        )
    text = cfg.objective != "vlm_sft"
    if text != (cfg.model.source == "causal_lm"):
        raise RecipeError(
            f"objective {cfg.objective} with model.source={cfg.model.source}: text objectives (clm, sft, dpo) "
            "train model.source=causal_lm and vlm_sft trains a VLM source (components, llava, tiny)"
        )
    if cfg.objective == "vlm_sft" and cfg.lora != LoraConfig():
        changed = ", ".join(f"lora.{k}" for k in _changed(cfg.lora, LoraConfig()))
        raise RecipeError(
            f"{changed}: LoRA/QLoRA adapters are trained for the text objectives (clm, sft, dpo) only; "
            "objective vlm_sft trains the parts in train.trainable"
        )
    unused = [key for key in _ineffective(cfg) if key in user_keys]
    if unused:
        raise RecipeError(
            f"{', '.join(unused)} would have no effect with objective={cfg.objective}, model.source="
            f"{cfg.model.source}, data.synthetic.kind={cfg.data.synthetic.kind}, lora.enabled={cfg.lora.enabled}: "
            "remove them, or set the key that makes them apply"
        )


def _check_steps(cfg: RunConfig) -> None:
    """The run's length comes from exactly one of train.max_steps and train.epochs."""
    steps, epochs = cfg.train.max_steps, cfg.train.epochs
    if steps is None and epochs is None:
        raise RecipeError(
            "missing required value(s): add train.max_steps=... (optimizer steps) or train.epochs=... "
            "(passes over the data) to the command line or set one of them in the recipe"
        )
    if steps is not None and epochs is not None:
        raise RecipeError(
            f"train.max_steps={steps} and train.epochs={epochs} are both set: the run's length comes from one "
            "of them; set the other to null (e.g. train.epochs=null train.max_steps=100)"
        )


def validate(cfg: RunConfig, user_keys: frozenset[str] = frozenset()) -> None:
    """Check enumerated values and numeric bounds, raising :class:`RecipeError` on the first violation."""
    for key, allowed in CHOICES.items():
        value = attrgetter(key)(cfg)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in allowed:
                raise RecipeError(f"invalid value {item!r} for '{key}': allowed are {', '.join(allowed)}")
    _check_ranges(cfg)
    tiny = cfg.model.tiny
    if tiny.patch_size < 1 or tiny.tile_size % tiny.patch_size:
        raise RecipeError(
            f"model.tiny.patch_size={tiny.patch_size} must divide model.tiny.tile_size="
            f"{tiny.tile_size}: pick a patch side such as 14 or 28 for 112 px tiles"
        )
    _check_steps(cfg)
    _check_conflicts(cfg, user_keys)
    if cfg.init_from and cfg.objective != "vlm_sft":
        raise RecipeError(
            f"init_from applies to objective vlm_sft; for {cfg.objective}, point model.llm at the previous "
            "stage's weights instead (an `ndino export` of that run)"
        )


_LEGACY_SECTIONS = {("model", "tiny_"): "tiny", ("data", "synthetic_"): "synthetic"}
"""Flat keys of earlier releases (``model.tiny_layers``, ``data.synthetic_train``) -> their nested section."""


def upgrade_legacy_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Move the flat demo keys of run folders written by earlier releases into today's nested sections
    (``model.tiny_layers`` -> ``model.tiny.layers``, ``data.synthetic: shapes`` -> ``data.synthetic.kind``),
    so that their ``config.yaml`` still loads; ``values`` is not modified."""
    values = dict(values)
    for (section, prefix), nested in _LEGACY_SECTIONS.items():
        part = values.get(section)
        if not isinstance(part, dict):
            continue
        part = dict(part)
        if nested in part and not isinstance(part[nested], dict):
            part[nested] = {"kind": part[nested]}
        for key in [k for k in part if k.startswith(prefix)]:
            part.setdefault(nested, {})[key.removeprefix(prefix)] = part.pop(key)
        values[section] = part
    return values
