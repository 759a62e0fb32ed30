"""Models for training and inference: build the model a recipe asks for, load a trained run,
checkpoint or HF LlavaNext folder, and initialise from an earlier stage's weights (``init_from``)
whatever the key layout (transformers 4.x/5.x, original LLaVA-NeXT).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration

from llava_ndino.config import ModelConfig, RunConfig
from llava_ndino.formats.run_dir import SKELETON_DIR, find_checkpoint, load_model_weights, resolve_resume
from llava_ndino.model.build import (
    LoadOptions,
    assemble,
    assemble_from_folders,
    load_llava,
    make_image_processor,
)
from llava_ndino.model.tiny import tiny_llm, tiny_vision_tower
from llava_ndino.model.tokenizer import train_tiny_tokenizer

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, seed: int) -> tuple[LlavaNextForConditionalGeneration, object]:
    """Build the model and processor a recipe asks for (weights are seeded for reproducibility)."""
    from llava_ndino.formats.prompts import llava_chat_template

    torch.manual_seed(seed)
    options = LoadOptions(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    projector = Path(cfg.projector) if cfg.projector else None
    if cfg.source == "tiny":
        sizes = cfg.tiny
        tokenizer = train_tiny_tokenizer(vocab_size=sizes.vocab_size)
        vision = tiny_vision_tower(sizes)
        llm = tiny_llm(tokenizer, sizes)
        image_processor = make_image_processor(sizes.tile_size)
        model, processor = assemble(vision, llm, tokenizer, image_processor, llava_chat_template(), projector)
        model.set_attn_implementation(cfg.attn_implementation)
        return model, processor
    if cfg.source == "components":
        if not cfg.vision or not cfg.llm:
            raise ValueError("model.source=components needs model.vision=DIR and model.llm=DIR")
        return assemble_from_folders(cfg.vision, Path(cfg.llm), projector, options)
    if not cfg.llava:
        raise ValueError("model.source=llava needs model.llava=DIR (an HF LlavaNext folder)")
    return load_llava(Path(cfg.llava), options)


def save_skeleton(model: LlavaNextForConditionalGeneration, processor, run_dir: Path) -> Path:
    """Write the model config and processor (no weights) to ``run_dir/model`` so checkpoints can be loaded."""
    out = Path(run_dir) / SKELETON_DIR
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def load_trained(
    path: Path, options: LoadOptions | None = None
) -> tuple[LlavaNextForConditionalGeneration, object]:
    """Load a model for inference or export from a run directory, a checkpoint or an HF LlavaNext folder."""
    path = Path(path)
    ckpt = find_checkpoint(path)
    if ckpt is None:
        return load_llava(path, options)
    skeleton = ckpt.parent.parent / SKELETON_DIR
    if not (skeleton / "config.json").is_file():
        raise FileNotFoundError(f"{skeleton} is missing: the run directory of {ckpt} is incomplete")
    config = LlavaNextConfig.from_pretrained(str(skeleton))
    options = options or LoadOptions()
    config._attn_implementation = options.attn_implementation
    with init_empty_weights(include_buffers=False):  # parameters come from the checkpoint
        model = LlavaNextForConditionalGeneration(config)
    state = _read_weights(ckpt / "model.safetensors", options)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ValueError(
            f"{ckpt}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    model.generation_config = model.generation_config.from_pretrained(str(skeleton))
    log.info("loaded %s (step checkpoint of %s)", ckpt, ckpt.parent.parent)
    return model.eval(), AutoProcessor.from_pretrained(str(skeleton))


def _read_weights(path: Path, options: LoadOptions) -> dict[str, torch.Tensor]:
    """Read a safetensors file tensor by tensor, converting each to ``options.dtype`` as it arrives, so
    the file's dtype and the target dtype never coexist in host RAM for the whole model."""
    dtype = options.torch_dtype() if options.dtype != "auto" else None
    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            tensor = handle.get_tensor(key)
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def _is_tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(model.config.get_text_config().tie_word_embeddings)


_INIT_FROM_HINT = (
    "pass a run directory, a checkpoint (RUN/checkpoints/step_N) or an HF LlavaNext folder "
    "(config.json + *.safetensors, e.g. `ndino export` output)"
)


# Every LlavaNext key layout -> one canonical name: transformers 5 in memory (model.vision_tower.*,
# model.language_model.*, lm_head.*), its save_pretrained (language_model.model.*, vision_tower.*)
# and the original LLaVA-NeXT layout of our exports and released checkpoints (vision_tower.vision_model.*).
_CANONICAL_KEY_RULES = [
    (re.compile(r"^model\.(?=vision_tower\.|multi_modal_projector\.|language_model\.|image_newline)"), ""),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]


def apply_init_from(model: nn.Module, cfg: RunConfig) -> None:
    """Initialise ``model`` from ``cfg.init_from``, unless ``cfg.resume`` finds a checkpoint (resume wins).

    Call it on the full, unpartitioned model, before an engine wraps or shards it.
    """
    if not cfg.init_from:
        return
    resumed = resolve_resume(cfg.resume, Path(cfg.output_dir))
    if resumed is not None:
        log.info("init_from=%s ignored: the run resumes from %s", cfg.init_from, resumed)
        return
    load_init_weights(model, Path(cfg.init_from))


def load_init_weights(model: nn.Module, path: Path) -> None:
    """Copy the weights at ``path`` into ``model`` in place; optimiser, scheduler and step are untouched.

    ``path`` is a run directory (its latest complete checkpoint), a checkpoint directory or an HF
    LlavaNext folder (any key layout). Every key and shape must match the model.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"init_from={path} does not exist: {_INIT_FROM_HINT}")
    ckpt = find_checkpoint(path)
    if ckpt is not None:
        state = load_model_weights(ckpt)
        shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
        _check_init_state(model, shapes, path)
        _copy_into(model, state)
        source = f"checkpoint {ckpt}"
    else:
        files = _safetensors_files(path)
        names, shapes = _hf_weight_names(files, model)
        _check_init_state(model, shapes, path)
        for file in files:  # one shard in memory at a time
            _copy_into(model, {names[key]: tensor for key, tensor in load_file(str(file)).items()})
        source = f"HF LlavaNext folder {path} ({len(files)} safetensors file(s))"
    values = sum(math.prod(shape) for shape in shapes.values())
    log.info("init_from: loaded %d tensors (%s values) from %s", len(shapes), f"{values:,}", source)


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF model folder (the index's shards, or model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shards]
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(
        f"init_from={folder} is neither a run directory (checkpoints/), a checkpoint (trainer_state.json) "
        f"nor an HF LlavaNext folder with safetensors weights: {_INIT_FROM_HINT}"
    )


def _canonical_key(key: str) -> str:
    """Map a LlavaNext weight name in any layout (see ``_CANONICAL_KEY_RULES``) to one spelling."""
    for pattern, replacement in _CANONICAL_KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def _hf_weight_names(
    files: list[Path], model: nn.Module
) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Read the headers of ``files``: each weight name -> the model's state_dict key (unknown names
    map to themselves), and each such key -> its shape."""
    own = {_canonical_key(key): key for key in model.state_dict()}
    names, shapes = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                names[key] = own.get(_canonical_key(key), key)
                shapes[names[key]] = tuple(handle.get_slice(key).get_shape())
    return names, shapes


def _check_init_state(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise ValueError naming ``path`` unless ``shapes`` covers exactly the model's keys with equal shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in shapes and not _is_tied(model, k)]
    unexpected = [k for k in shapes if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"init_from={path}: its weights do not match the model built by the recipe: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]}); "
            "build the same model (model.source, model.vision/llm/llava, sizes) that wrote them"
        )
    for key, tensor in own.items():
        if key in shapes and tuple(tensor.shape) != shapes[key]:
            raise ValueError(
                f"init_from={path}: shape mismatch for {key}: {list(shapes[key])} in the weights, "
                f"{list(tensor.shape)} in the model built by the recipe"
            )


@torch.no_grad()
def _copy_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's tensors in place, casting to their dtype."""
    own = model.state_dict()
    for key, tensor in state.items():
        own[key].copy_(tensor)
