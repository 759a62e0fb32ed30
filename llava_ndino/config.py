"""Typed run configuration: the dataclass schema, recipe loading and command-line overrides.

A run is described by a :class:`RunConfig`. :func:`load_config` builds one from command-line
tokens: the schema defaults, then the recipe YAML named by ``recipe=``, then ``dotted.key=value``
overrides. OmegaConf structured configs coerce the values to the declared types; this module adds
clear errors for unknown keys (naming the closest valid key), enumerated values and missing
required values. Every error is a :class:`RecipeError`.

The string literal under each field is its documentation: :func:`describe_config` reads it back
from this module's source with :mod:`ast`, so it is written only once.
"""

import ast
import difflib
import json
from dataclasses import Field, dataclass, field, fields, is_dataclass
from functools import cache
from itertools import pairwise
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llava_ndino.formats.prompts import TEMPLATES
from llava_ndino.formats.run_dir import CONFIG_FILE


class RecipeError(ValueError):
    """A recipe, a command-line override or the configuration they produce is invalid."""


@dataclass
class TinyConfig:
    """Sizes of the tiny random VLM (model.source=tiny) that the demo and the tests build in code."""

    tile_size: int = 112
    """Image tile side in pixels (a multiple of patch_size; CLIP ViT-L/14-336 uses 336)."""
    patch_size: int = 14
    """Vision patch side in pixels (CLIP ViT-L/14 uses 14); it must divide tile_size."""
    hidden_size: int = 128
    """Hidden size of the language model."""
    layers: int = 2
    """Number of language-model layers."""
    vision_hidden_size: int = 64
    """Hidden size of the vision encoder."""
    vision_layers: int = 2
    """Number of vision-encoder layers (at least 2: LLaVA reads the features of layer -2)."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary of the tiny tokenizer, before LLaMA-3's special tokens."""


@dataclass
class SyntheticConfig:
    """Generated training data instead of files (the demo's shapes set)."""

    kind: str | None = None
    """Which set to generate instead of reading data.path (shapes: the demo's coloured-shapes questions)."""
    train: int = 2000
    """Number of synthetic training samples."""
    eval: int = 200
    """Number of synthetic evaluation samples."""
    image_size: int = 160
    """Side of the synthetic images in pixels."""


@dataclass
class ModelConfig:
    """Which model to build and where its weights come from."""

    source: str = "components"
    """How to build the model: components (vision + llm folders), llava (an HF LlavaNext folder), tiny (a tiny random VLM built in code, for the demo) or causal_lm (the text-only causal LM at model.llm, for objectives clm, sft and dpo)."""
    vision: str | None = None
    """Vision tower: an HF CLIPVisionModel folder, or openclip:NAME_OR_DIR[:WEIGHTS]."""
    llm: str | None = None
    """Language model: an HF causal-LM folder."""
    llava: str | None = None
    """An HF LlavaNext folder (model.source=llava)."""
    projector: str | None = None
    """Pretrained projector weights: a LLaVA mm_projector.bin."""
    dtype: str = "auto"
    """Parameter dtype (auto: let the loader choose)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the language model."""
    tiny: TinyConfig = field(default_factory=TinyConfig)
    """model.source=tiny: sizes of the tiny random VLM built in code."""


@dataclass
class DataConfig:
    """What to train on."""

    path: str | None = None
    """Training data: LLaVA conversations (JSON list, JSONL, or a shard folder from `ndino data shard`, streamed) for vlm_sft; JSONL rows {"text"} for clm, {"instruction", "input", "output"} or {"messages"} for sft, {"prompt", "chosen", "rejected"} for dpo."""
    image_root: str | None = None
    """Folder that the image paths in the data are relative to."""
    template: str = "llama3"
    """Chat template that turns conversations into tokens."""
    max_length: int = 2048
    """Maximum sequence length in tokens."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""
    max_skip_ratio: float = 0.01
    """Largest fraction of samples that may be skipped as unusable before the run fails."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generated data instead of data.path (the demo)."""
    isolate_documents: bool = False
    """clm: keep attention inside each document of a packed block (positions restart per document); false lets attention cross the eos between documents, as plain concatenation does."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are skipped as decompression bombs (reason image_too_large)."""
    group_by_length: bool = False
    """Sample batches of one modality (image or text-only) and similar token length, to cut padding."""
    group_window: int = 64
    """data.group_by_length: batches per window whose samples are sorted by length before batching."""
    packing: bool = False
    """Pack each micro-batch's samples into one row with attention isolated per sample (no padding)."""
    pack_length: int = 0
    """data.packing: most tokens per packed row (0: the whole micro-batch in one row)."""
    mixture: str | None = None
    """Train on a stage mixture of data_manifests/ (e.g. short_it) instead of data.path; see `ndino data list`."""
    root: str | None = None
    """Local folder holding the manifests' data sets (null: the NDINO_DATA_ROOT environment variable)."""
    shuffle_buffer: int = 1000
    """Streaming from shards: samples held in the shuffle buffer of each loader worker."""


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging."""

    max_steps: int = MISSING
    """Number of optimizer steps."""
    per_device_batch_size: int = 4
    """Samples per device in each micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated into each optimizer step (derived when train.global_batch_size is set)."""
    global_batch_size: int = 0
    """0: the per-device batch and accumulation are fixed and the global batch grows with the GPU count; N: the global batch is fixed at N samples per step and accumulation (then the per-device batch) adapts to the world size."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON to use instead of launch/deepspeed/ENGINE.json with engine=zero*; "auto" values are filled from the recipe."""
    lr: float = 1e-5
    """Peak learning rate."""
    lr_vision: float | None = None
    """Peak learning rate of the vision tower (null: train.lr)."""
    lr_projector: float | None = None
    """Peak learning rate of the projector (null: train.lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: str = "adamw"
    """adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes; paged falls back to unpaged on CPU)."""
    warmup_ratio: float = 0.03
    """Fraction of train.max_steps over which the learning rate warms up."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    trainable: list[str] = field(default_factory=lambda: ["projector", "newline"])
    """Parts of the model to train (newline: the image-newline embedding); text objectives train every weight, or only the adapters with lora.enabled."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    save_every: int = 500
    """Save a checkpoint every N optimizer steps."""
    save_last: bool = True
    """Save a checkpoint when training ends (false only for benchmarks and dry runs: nothing is kept)."""
    keep_last: int = 3
    """Number of most recent checkpoints to keep."""
    cpu_threads: int = 0
    """Threads torch uses on CPU (0 keeps torch's default); 1 is fastest for tiny models."""


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, and QLoRA with quantize=4bit) for the text objectives."""

    enabled: bool = False
    """Train LoRA adapters on a frozen base model instead of every weight."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: adapters are scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters (e.g. [q_proj, v_proj]), or [all-linear] for every linear layer but the output head."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    quantize: str = "none"
    """Frozen base precision: none, or 4bit for QLoRA (bitsandbytes NF4, double quantisation, bf16 compute)."""


@dataclass
class DpoConfig:
    """Direct preference optimisation (objective dpo)."""

    beta: float = 0.1
    """Strength of the implicit KL penalty towards the reference model."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens keep their last tokens; data.max_length caps prompt + answer."""


@dataclass
class RunConfig:
    """A whole training run."""

    recipe: str = ""
    """Name or path of the recipe the run was loaded from (set by the loader)."""
    description: str = ""
    """One-line summary shown by `ndino recipes`."""
    output_dir: str = MISSING
    """Run folder for checkpoints, logs and the resolved config.yaml."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir, if any), none (start afresh) or a checkpoint path."""
    init_from: str | None = None
    """Weights that initialise the model before training (vlm_sft): a run directory (its latest checkpoint), a checkpoint (RUN/checkpoints/step_N) or an HF LlavaNext folder; keys and shapes must match the recipe's model. Only weights: optimizer, scheduler and step start fresh. Ignored when resume finds a checkpoint."""
    seed: int = 0
    """Random seed."""
    objective: str = "vlm_sft"
    """What to train: vlm_sft (image + conversation, loss on the answers), clm (packed raw text), sft (text instructions/chats, loss on the answers) or dpo (preference pairs, sigmoid DPO loss)."""
    engine: str = "single"
    """How the loop runs: single (one process; becomes ddp under torchrun with several processes), ddp (DistributedDataParallel; single when there is one process), or DeepSpeed zero2, zero2_offload, zero3, zero3_offload (configs in launch/deepspeed/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model construction."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpointing."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters for text objectives."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Preference optimisation settings."""


DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""Parameter dtypes a model can be loaded in (auto: as the weights are stored)."""
ATTENTION: tuple[str, ...] = ("sdpa", "eager", "flash_attention_2")
"""Attention kernels of the language model (flash_attention_2 needs the gpu extra)."""
ENGINES: tuple[str, ...] = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")
"""Values of ``engine``: one process, DDP, and the DeepSpeed ZeRO configs in launch/deepspeed/."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("components", "llava", "tiny", "causal_lm"),
    "objective": ("vlm_sft", "clm", "sft", "dpo"),
    "model.dtype": DTYPES,
    "model.attn_implementation": ATTENTION,
    "data.template": tuple(TEMPLATES),
    "engine": ENGINES,
    "data.synthetic.kind": ("shapes",),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.trainable": ("projector", "vision", "llm", "newline"),
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "lora.quantize": ("none", "4bit"),
}
"""Allowed values of enumerated keys; a list key takes any of them, an optional key also null."""

_RANGES: dict[str, tuple[float, float | None]] = {
    "train.max_steps": (1, None),
    "train.per_device_batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.global_batch_size": (0, None),
    "train.warmup_ratio": (0, 1),
    "data.max_skip_ratio": (0, 1),
    "lora.r": (1, None),
    "lora.dropout": (0, 1),
    "dpo.beta": (0, None),
    "dpo.max_prompt_length": (1, None),
    "data.max_pixels": (1, None),
    "data.group_window": (1, None),
    "data.shuffle_buffer": (1, None),
}
"""Inclusive (low, high) bounds of numeric keys; high None means unbounded."""


def recipes_dir() -> Path:
    """Return the folder of shipped recipes (``llava_ndino/recipes``; the repo's ``recipes/`` links here)."""
    return Path(__file__).resolve().parent / "recipes"


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
    _validate(run)
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
        choices = f"  [{'|'.join(_CHOICES[key])}]" if key in _CHOICES else ""
        lines += [f"  {key}: {annotation} = {shown}{choices}", f"      {doc}"]
    return "\n".join(lines)


@cache
def _schema() -> dict[str, tuple[str, str, Field]]:
    """Map every dotted key of :class:`RunConfig`, sections included, to (annotation, docstring, field).

    Annotations and docstrings are parsed from this module's source; keys come in declaration order.
    """
    docs: dict[tuple[str, str], tuple[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
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


def _validate(cfg: RunConfig) -> None:
    """Check enumerated values and numeric bounds, raising :class:`RecipeError` on the first violation."""
    for key, allowed in _CHOICES.items():
        value = attrgetter(key)(cfg)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in allowed:
                raise RecipeError(f"invalid value {item!r} for '{key}': allowed are {', '.join(allowed)}")
    for key, (low, high) in _RANGES.items():
        value = attrgetter(key)(cfg)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise RecipeError(f"invalid value {value!r} for '{key}': must be {bound}")
    tiny = cfg.model.tiny
    if tiny.patch_size < 1 or tiny.tile_size % tiny.patch_size:
        raise RecipeError(
            f"model.tiny.patch_size={tiny.patch_size} must divide model.tiny.tile_size="
            f"{tiny.tile_size}: pick a patch side such as 14 or 28 for 112 px tiles"
        )
    if cfg.init_from and cfg.objective != "vlm_sft":
        raise RecipeError(
            f"init_from applies to objective vlm_sft; for {cfg.objective}, point model.llm at the previous "
            "stage's weights instead (an `ndino export` of that run)"
        )
