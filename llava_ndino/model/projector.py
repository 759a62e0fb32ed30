"""Import and export of LLaVA ``mm_projector.bin`` files (mlp2x_gelu: Linear, GELU, Linear).

LLaVA-1.5 and LLaVA-NeXT save the projector as ``model.mm_projector.0.*`` and
``model.mm_projector.2.*``; other tools strip or add prefixes. Every variant maps to transformers'
``multi_modal_projector.linear_1`` / ``linear_2``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

# index inside LLaVA's nn.Sequential(Linear, GELU, Linear) -> transformers' module name
_LLAVA_INDEX_TO_HF = {"0": "linear_1", "2": "linear_2"}
_KEY_PATTERN = re.compile(r"(?:^|\.)(?:mm_projector\.)?(0|2)\.(weight|bias)$")
_HF_KEY_PATTERN = re.compile(r"(?:^|\.)(linear_[12])\.(weight|bias)$")


def read_projector_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a projector checkpoint (``.bin``/``.pt`` via ``weights_only`` or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"projector file {path} does not exist: pass the mm_projector.bin of an align run"
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def projector_state_from_llava(
    state: dict[str, torch.Tensor], source: str = "projector"
) -> dict[str, torch.Tensor]:
    """Map LLaVA projector keys (any prefix) to ``linear_1.*``/``linear_2.*``.

    Accepts ``model.mm_projector.0.weight``, ``mm_projector.0.weight``, ``0.weight`` and
    transformers-style ``multi_modal_projector.linear_1.weight``. Raises when the file holds no
    projector, or holds two candidates for the same weight.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in state.items():
        hf = _HF_KEY_PATTERN.search(key)
        llava = _KEY_PATTERN.search(key) if "mm_projector" in key or key.count(".") == 1 else None
        if hf:
            name = f"{hf.group(1)}.{hf.group(2)}"
        elif llava:
            name = f"{_LLAVA_INDEX_TO_HF[llava.group(1)]}.{llava.group(2)}"
        else:
            continue
        if name in mapped:
            raise ValueError(
                f"{source}: both '{origin[name]}' and '{key}' map to {name}; keep one projector per file"
            )
        mapped[name] = tensor
        origin[name] = key
    expected = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    if set(mapped) != expected:
        raise ValueError(
            f"{source}: expected an mlp2x_gelu projector (keys like model.mm_projector.0.weight and "
            f"model.mm_projector.2.weight), found keys {sorted(state)[:8]}"
        )
    log.info("projector: loaded %s from %s", ", ".join(f"{origin[k]} -> {k}" for k in sorted(mapped)), source)
    return mapped


def load_projector_into(projector: torch.nn.Module, path: Path) -> None:
    """Load an ``mm_projector.bin`` into ``projector`` (a LlavaNext multi_modal_projector), checking shapes."""
    state = projector_state_from_llava(read_projector_file(path), source=str(path))
    own = projector.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but the model needs {tuple(own[key].shape)}; "
                "the projector was trained for another vision tower or language model"
            )
    projector.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def save_projector(projector: torch.nn.Module, path: Path) -> None:
    """Write ``projector`` as a LLaVA ``mm_projector.bin`` (keys ``model.mm_projector.{0,2}.*``)."""
    hf_to_llava = {v: k for k, v in _LLAVA_INDEX_TO_HF.items()}
    state = {}
    for key, tensor in projector.state_dict().items():
        module, kind = key.split(".")
        state[f"model.mm_projector.{hf_to_llava[module]}.{kind}"] = tensor.detach().cpu().clone()
    torch.save(state, str(path))
