"""Assembly of transformers' ``LlavaNextForConditionalGeneration`` from a CLIP tower and a LLaMA-3 LM.

Nothing here re-implements the model: it adds the ``<image>`` and pad tokens, resizes the
embeddings (new rows = mean of the old ones), writes the LLaVA-NeXT config (anyres pinpoints,
layer -2, ``default`` select strategy, mlp2x_gelu projector) and moves the pretrained weights in.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llava_ndino.formats.tokens import END_OF_TEXT, EOT
from llava_ndino.model.projector import load_projector_into

log = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics, used by CLIP ViT-L/14-336 and therefore by LLaVA-NeXT.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# LLaVA-NeXT's anyres grid for 336 px tiles, written (W, H) as LLaVA does.
LLAVA_PINPOINTS_WH = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
OPENCLIP_PREFIX = "openclip:"


@dataclass
class LoadOptions:
    """How to load weights: dtype (``auto`` keeps the checkpoint's) and attention kernel."""

    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2 (needs the flash-attn package and a GPU)."""

    def torch_dtype(self) -> torch.dtype | str:
        """Return the dtype for ``from_pretrained`` (``"auto"`` passes through)."""
        return "auto" if self.dtype == "auto" else getattr(torch, self.dtype)

    def check(self) -> None:
        """Raise a clear error when flash attention is asked for but not usable."""
        if self.attn_implementation == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError as err:
                raise RuntimeError(
                    "attn_implementation=flash_attention_2 needs flash-attn: pip install 'llava-ndino[gpu]', "
                    "or use attn_implementation=sdpa"
                ) from err


def hf_pinpoints(tile: int) -> list[list[int]]:
    """Return LLaVA-NeXT's pinpoints scaled to ``tile`` px and stored (H, W) as transformers expects."""
    return [[h * tile // 336, w * tile // 336] for w, h in LLAVA_PINPOINTS_WH]


def make_image_processor(tile: int, mean: list[float] | None = None, std: list[float] | None = None):
    """Return the anyres ``LlavaNextImageProcessor`` for ``tile`` px tiles (CLIP statistics by default)."""
    return LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=hf_pinpoints(tile),
        image_mean=mean or CLIP_MEAN,
        image_std=std or CLIP_STD,
    )


def load_vision_tower(spec: str, options: LoadOptions) -> tuple[CLIPVisionModel, dict]:
    """Load a vision tower: an HF CLIP folder, or ``openclip:NAME_OR_DIR[:WEIGHTS]`` (converted).

    Returns the tower and the pixel statistics (``mean``/``std``) found beside it.
    """
    if spec.startswith(OPENCLIP_PREFIX):
        from llava_ndino.model.openclip_tower import load_openclip_model, openclip_to_hf_clip_vision

        name, _, weights = spec[len(OPENCLIP_PREFIX) :].partition(":")
        oc_model = load_openclip_model(name, Path(weights) if weights else None)
        tower = openclip_to_hf_clip_vision(oc_model)
        preprocess = getattr(oc_model.visual, "preprocess_cfg", {})  # the tower's own pixel statistics
        stats = {"mean": preprocess.get("mean"), "std": preprocess.get("std")}
        return tower.to(options.torch_dtype() if options.dtype != "auto" else torch.float32), stats
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vision tower {folder} has no config.json: pass an HF CLIP folder "
            "(e.g. openai/clip-vit-large-patch14-336 downloaded locally) or openclip:NAME:WEIGHTS"
        )
    tower = CLIPVisionModel.from_pretrained(
        str(folder), dtype=options.torch_dtype(), attn_implementation=options.attn_implementation
    )
    stats = {}
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        stats = {"mean": cfg.get("image_mean"), "std": cfg.get("image_std")}
    return tower, stats


def add_vlm_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add ``<image>`` and a dedicated pad token (never id 0, never an eos/bos)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, reuse: tuple[str, ...] = ()) -> None:
    """Give ``tokenizer`` a pad token that is never id 0, eos or bos (pad = eos would mask eos out of the loss).

    The first special token of ``reuse`` that the tokenizer already has becomes the pad (no new
    embedding row); otherwise ``<pad>`` is added.
    """
    forbidden = {0, tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in forbidden:
        return
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    vocab = tokenizer.get_vocab()
    usable = [t for t in reuse if t in special and vocab.get(t) not in forbidden]
    if usable:
        tokenizer.pad_token = usable[0]
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tokenizer.pad_token_id not in forbidden


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos: int | list[int] | None) -> list[int]:
    """Return ``eos`` plus LLaMA-3's ``<|end_of_text|>`` and ``<|eot_id|>`` ids where the tokenizer has them.

    LLaMA-3 base models stop only on ``<|end_of_text|>``; a chat-tuned VLM ends its turns with ``<|eot_id|>``.
    """
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    vocab = tokenizer.get_vocab()
    return ids + [vocab[t] for t in (END_OF_TEXT, EOT) if t in vocab and vocab[t] not in ids]


def resize_embeddings_to_mean(model: PreTrainedModel, new_size: int) -> None:
    """Grow input and output embeddings to ``new_size`` rows; new rows are the mean of the old rows.

    A padded vocabulary (more rows than the tokenizer has tokens, e.g. 128320 for 128256 tokens)
    already has room for the new tokens and is kept as it is, never shrunk.
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size <= old_size:
        return
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            if emb is not None and emb.weight.shape[0] == new_size:
                emb.weight[old_size:] = emb.weight[:old_size].mean(dim=0, keepdim=True)
    log.info("resized embeddings %d -> %d rows (new rows = mean of the old)", old_size, new_size)


def assemble(
    vision: CLIPVisionModel,
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: LlavaNextImageProcessor,
    chat_template: str,
    projector: Path | None = None,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Build a LlavaNext model and processor around already-loaded components (their weights are reused).

    ``chat_template`` is stored in the processor. A ``projector`` file (LLaVA ``mm_projector.bin``)
    replaces the random projector.
    """
    add_vlm_tokens(tokenizer)
    resize_embeddings_to_mean(llm, len(tokenizer))
    tile = vision.config.image_size
    config = LlavaNextConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=hf_pinpoints(tile),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(tile // vision.config.patch_size) ** 2,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    dtype = llm.dtype
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    hidden = llm.config.hidden_size
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(dtype)
    model.model.image_newline = nn.Parameter(torch.randn(hidden, dtype=dtype) / math.sqrt(hidden))
    if projector is not None:
        load_projector_into(model.model.multi_modal_projector, projector)
    model.generation_config = llm.generation_config
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, llm.generation_config.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def assemble_from_folders(
    vision_spec: str, llm_dir: Path, projector: Path | None = None, options: LoadOptions | None = None
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Load a CLIP tower and an HF causal-LM folder and assemble them (see :func:`assemble`)."""
    from llava_ndino.formats.prompts import llava_chat_template

    options = options or LoadOptions()
    options.check()
    vision, stats = load_vision_tower(vision_spec, options)
    llm_dir = Path(llm_dir)
    if not (llm_dir / "config.json").is_file():
        raise FileNotFoundError(f"language model {llm_dir} has no config.json: pass an HF causal-LM folder")
    llm = AutoModelForCausalLM.from_pretrained(
        str(llm_dir), dtype=options.torch_dtype(), attn_implementation=options.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    image_processor = make_image_processor(vision.config.image_size, stats.get("mean"), stats.get("std"))
    model, processor = assemble(vision, llm, tokenizer, image_processor, llava_chat_template(), projector)
    model.set_attn_implementation(options.attn_implementation)
    return model, processor


def load_llava(
    folder: Path, options: LoadOptions | None = None
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Load an existing HF LlavaNext folder (ours or a released NDiNO checkpoint) as-is."""
    options = options or LoadOptions()
    options.check()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an HF LlavaNext folder (no config.json)")
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if (
        model_type != "llava_next"
    ):  # checked before building: a LLaMA folder would become a default 7B LlavaNext
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not a LlavaNext one (model_type llava_next): pass a run "
            "directory, a checkpoint or an HF LlavaNext folder (`ndino assemble` builds one from a tower and an LLM)"
        )
    model = LlavaNextForConditionalGeneration.from_pretrained(
        str(folder), dtype=options.torch_dtype(), attn_implementation=options.attn_implementation
    )
    processor = AutoProcessor.from_pretrained(str(folder))
    if processor.tokenizer.pad_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no pad token; re-export it with `ndino export`")
    return model, processor


def describe_parameters(model: nn.Module) -> str:
    """Return a table of trainable and frozen parameter counts per LlavaNext part."""
    parts = {
        "vision": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm": model.model.language_model,
        "lm_head": model.lm_head,
    }
    rows = []
    for name, module in parts.items():
        params = list(module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append(f"{name:>10}: {trainable:>14,} trainable / {total - trainable:>14,} frozen")
    newline = model.model.image_newline
    rows.append(f"{'newline':>10}: {newline.numel() if newline.requires_grad else 0:>14,} trainable")
    return "\n".join(rows)
