"""open_clip vision towers: build them offline and convert them to a Hugging Face ``CLIPVisionModel``.

``spec`` conventions of :func:`load_openclip_model` and :func:`load_openclip_as_hf`:

* ``local-dir:/path`` or an existing folder path: an open_clip local folder with ``open_clip_config.json``
  and a weights file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ...), as written
  by :func:`write_tiny_openclip`; ``weights`` may override the folder's weights file.
* an open_clip model name (``ViT-L-14-336``, ``ViT-L-14-336-quickgelu``, or a name registered with
  ``open_clip.add_model_config``) plus ``weights``: a local checkpoint with ``visual.*`` keys (an OpenAI or
  open_clip state dict as ``.safetensors``/``.bin``/``.pt``, or an OpenAI TorchScript archive).

Nothing is ever downloaded. OpenAI checkpoints were trained with QuickGELU: use the ``-quickgelu`` name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import PatchDropout, QuickGELU, ResidualAttentionBlock, VisionTransformer
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_ndino.formats.tensor_files import save_safetensors
from llava_ndino.model.torchscript_tensors import is_torchscript, read_torchscript_tensors

logger = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# Metadata entries that OpenAI TorchScript archives keep next to the weights.
_JIT_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def write_tiny_openclip(
    out_dir: Path,
    image_size: int = 336,
    patch_size: int = 14,
    width: int = 64,
    layers: int = 3,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a seeded random tiny QuickGELU open_clip ViT (with a minimal text tower) as an open_clip folder."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    model_cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
        # open_clip starts norms at 1/0 and attention biases at 0; jitter everything so that every
        # converted tensor, including those, influences the output.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    preprocess_cfg = {"size": image_size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_safetensors(state, out_dir / WEIGHTS_NAMES[0], metadata={"format": "pt"})
    return out_dir


def _resolve_spec(spec: str, weights: Path | None) -> tuple[str, Path]:
    """Map a spec to an open_clip ``create_model`` name and the local weights file to load."""
    if spec.startswith("hf-hub:"):
        raise ValueError(f"{spec!r}: downloads are disabled; download it and pass its local folder")
    folder = Path(spec.removeprefix(LOCAL_DIR_PREFIX))
    if spec.startswith(LOCAL_DIR_PREFIX) or folder.is_dir():
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{folder / CONFIG_NAME} not found: an open_clip folder needs this config; "
                "or pass an open_clip model name plus a weights file"
            )
        if weights is None:
            weights = next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"no weights file in {folder}: expected one of {WEIGHTS_NAMES}")
        model_name = f"{LOCAL_DIR_PREFIX}{folder}"
    else:
        if spec not in open_clip.list_models():
            raise ValueError(
                f"{spec!r} is neither an existing folder nor a known open_clip model name; register a "
                "custom architecture with open_clip.add_model_config(JSON) or pass a folder"
            )
        if weights is None:
            raise ValueError(f"open_clip model {spec!r} needs a local weights file; nothing is downloaded")
        model_name = spec
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"open_clip weights file not found: {weights}; download the checkpoint yourself and pass its local path"
        )
    return model_name, weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (safetensors, weights-only torch file, or a TorchScript archive read as
    data) into a flat state dict."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif is_torchscript(path):  # OpenAI's CLIP releases: tensors read as data, the code never runs
            state = read_torchscript_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items() if k not in _JIT_METADATA_KEYS}


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load the image tower strictly from ``path``, and the text tower too when the file matches it."""
    state = _read_state_dict(path)
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    expected = model.visual.state_dict()
    missing = sorted(expected.keys() - visual.keys())
    unexpected = sorted(visual.keys() - expected.keys())
    wrong_shape = [k for k in expected.keys() & visual.keys() if expected[k].shape != visual[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path}: its 'visual.*' weights do not fit the open_clip image tower ({len(missing)} missing, "
            f"e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}; wrong shapes: "
            f"{sorted(wrong_shape)[:3]}; first keys in file: {list(state)[:3]}). Use the model name or "
            "folder of the architecture that produced the checkpoint (e.g. ViT-L-14-336, not ViT-L-14); "
            "timm or HF checkpoints must be converted to open_clip format first"
        )
    model.visual.load_state_dict(visual)
    text = {k: v.shape for k, v in state.items() if not k.startswith("visual.")}
    if text == {k: v.shape for k, v in model.state_dict().items() if not k.startswith("visual.")}:
        model.load_state_dict({k: state[k] for k in text}, strict=False)
    else:
        logger.info("%s: text tower not loaded (image-only checkpoint or other text config)", path)


def load_openclip_model(spec: str, weights: Path | None = None) -> nn.Module:
    """Build an open_clip CLIP model (eval mode, fp32, CPU) from a local folder or a name plus local weights."""
    model_name, weights_file = _resolve_spec(spec, weights)
    model = open_clip.create_model(model_name, load_weights=False, pretrained_text=False, device="cpu")
    _load_weights(model, weights_file)
    logger.info("loaded open_clip model %s from %s", model_name, weights_file)
    return model.eval()


def _hidden_act(block: ResidualAttentionBlock) -> str | None:
    """Return the HF ``hidden_act`` equivalent to the block's MLP activation, or None if there is none."""
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    return "gelu" if isinstance(act, nn.GELU) and act.approximate == "none" else None


def _check_convertible(visual: nn.Module) -> float:
    """Raise NotImplementedError unless HF CLIP computes exactly what ``visual`` does; return the LN eps."""
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"cannot convert open_clip image tower {type(visual).__name__}: only open_clip's "
            "VisionTransformer maps to HF CLIPVisionModel (not timm or ModifiedResNet towers)"
        )
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional pooling")
    if visual.pool_type != "tok":
        problems.append(f"pool_type={visual.pool_type!r} (HF CLIP pools the CLS token)")
    if isinstance(visual.patch_dropout, PatchDropout):
        problems.append("patch dropout (rebuild with patch_dropout=0)")
    if len(set(visual.image_size)) != 1 or len(set(visual.patch_size)) != 1:
        problems.append("non-square image or patch size")
    norms = [visual.ln_pre, visual.ln_post]
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock:
            problems.append(f"{type(block).__name__} (qk-norm, cosine attention or head/sub-layer scaling)")
            continue
        norms += [block.ln_1, block.ln_2]
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            problems.append("layer scale (ls_init_value)")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            problems.append("separate or bias-free q/k/v projections")
        if _hidden_act(block) is None:
            problems.append(f"activation {block.mlp.gelu!r} (only QuickGELU and exact GELU)")
    if not all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms):
        problems.append("norms other than affine LayerNorm (e.g. no_ln_pre or custom norm_layer)")
    eps = {n.eps for n in norms if isinstance(n, nn.LayerNorm)}
    if len(eps) > 1:
        problems.append(f"differing LayerNorm eps {sorted(eps)}")
    if problems:
        raise NotImplementedError(
            "this open_clip ViT cannot be represented by HF CLIPVisionModel: "
            + "; ".join(dict.fromkeys(problems))
        )
    return eps.pop()


def _weight_bias(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of a LayerNorm or Linear under ``prefix``."""
    return {f"{prefix}.weight": module.weight, f"{prefix}.bias": module.bias}


def openclip_to_hf_clip_vision(oc_model: nn.Module) -> CLIPVisionModel:
    """Convert an open_clip CLIP model's ViT image tower (or the tower itself) to an HF ``CLIPVisionModel``.

    The projection ``visual.proj`` is not part of ``CLIPVisionModel``; its output size is kept in
    ``config.projection_dim`` (``pooler_output @ visual.proj`` equals open_clip's ``encode_image``).
    """
    visual = getattr(oc_model, "visual", oc_model)
    eps = _check_convertible(visual)
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_hidden_act(blocks[0]),
        layer_norm_eps=eps,
        projection_dim=width if visual.proj is None else visual.proj.shape[1],
    )
    state = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        **_weight_bias("pre_layrnorm", visual.ln_pre),
        **_weight_bias("post_layernorm", visual.ln_post),
    }
    for i, block in enumerate(blocks):
        prefix = f"encoder.layers.{i}"
        # nn.MultiheadAttention packs the q, k and v projections, in this order, into one in_proj.
        weights, biases = block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)
        for name, weight, bias in zip("qkv", weights, biases, strict=True):
            state |= {
                f"{prefix}.self_attn.{name}_proj.weight": weight,
                f"{prefix}.self_attn.{name}_proj.bias": bias,
            }
        state |= {
            **_weight_bias(f"{prefix}.self_attn.out_proj", block.attn.out_proj),
            **_weight_bias(f"{prefix}.mlp.fc1", block.mlp.c_fc),
            **_weight_bias(f"{prefix}.mlp.fc2", block.mlp.c_proj),
            **_weight_bias(f"{prefix}.layer_norm1", block.ln_1),
            **_weight_bias(f"{prefix}.layer_norm2", block.ln_2),
        }
    hf_model = CLIPVisionModel(config)
    hf_model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return hf_model.eval()


def load_openclip_as_hf(spec: str, weights: Path | None = None) -> CLIPVisionModel:
    """Load an open_clip tower offline (see the module docstring for ``spec``) and convert it to HF CLIP."""
    hf_model = openclip_to_hf_clip_vision(load_openclip_model(spec, weights))
    fields = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "image_size")
    fields += ("patch_size", "hidden_act", "layer_norm_eps", "projection_dim")
    summary = ", ".join(f"{name}={getattr(hf_model.config, name)}" for name in fields)
    logger.info("converted open_clip tower %s to HF CLIPVisionModel: %s", spec, summary)
    return hf_model
