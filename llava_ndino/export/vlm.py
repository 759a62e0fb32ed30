"""Writing HF LlavaNext folders that plain ``transformers`` 4.x and 5.x both load with no custom code.

The weights use the original LLaVA-NeXT key layout (``vision_tower.vision_model.*``,
``language_model.model.*``, ``language_model.lm_head.*``), which released NDiNO checkpoints use and
both major versions map onto their modules. The processor is written both nested
(``processor_config.json``, 5.x) and flat (``preprocessor_config.json``, 4.x), the tokenizer
names a class and lists its extra special tokens the way both versions read them, and the config
spells RoPE both ways (5.x ``rope_parameters``, 4.x ``rope_theta``/``rope_scaling``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from llava_ndino.export.folders import atomic_folder
from llava_ndino.formats.tensor_files import save_safetensors
from llava_ndino.formats.tokens import END_OF_TEXT, EOT
from llava_ndino.model.hf_files import make_config_portable, make_tokenizer_portable

log = logging.getLogger(__name__)

SHARD_BYTES = 4 * 1024**3
# in-memory (transformers 5) prefix -> on-disk prefix of the original LLaVA-NeXT layout
_LEGACY_PREFIXES = [
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
]


def legacy_key(key: str) -> str:
    """Map a transformers-5 LlavaNext parameter name to the original LLaVA-NeXT checkpoint name."""
    for new, old in _LEGACY_PREFIXES:
        if key.startswith(new):
            rest = key[len(new) :]
            if new == "model.vision_tower." and rest.startswith("vision_model."):
                rest = rest[len("vision_model.") :]
            return old + rest
    raise KeyError(f"unexpected LlavaNext parameter {key!r}")


def _unique_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (legacy name, tensor) once per storage, skipping tied copies such as a tied lm_head."""
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        yield legacy_key(key), tensor


def write_sharded_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path) -> None:
    """Stream tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards plus an index (one shard in RAM at a time)."""
    shard_keys: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_safetensors(current, out_dir / f"shard-{len(shard_keys)}.tmp", metadata={"format": "pt"})
        shard_keys.append(list(current))
        current.clear()

    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        current[key] = tensor.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shard_keys) == 1:
        os.replace(out_dir / "shard-0.tmp", out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, keys in enumerate(shard_keys):
        name = f"model-{i + 1:05d}-of-{len(shard_keys):05d}.safetensors"
        os.replace(out_dir / f"shard-{i}.tmp", out_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_llava_folder(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    out: Path,
    sources: list[Path] = (),
    force: bool = False,
) -> Path:
    """Write ``model`` and ``processor`` to ``out`` atomically (temp folder, then rename); ``out`` is
    checked against ``sources`` and existing folders first (see :func:`check_output_folder`).

    The generation config stops on both ``<|end_of_text|>`` and ``<|eot_id|>``.
    """
    out = Path(out)
    with atomic_folder(out, sources, force) as tmp:
        model.config.save_pretrained(str(tmp))
        make_config_portable(tmp)
        tokenizer = processor.tokenizer
        stop_ids = [
            i for i in (tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, EOT)) if i is not None
        ]
        generation = model.generation_config
        generation.eos_token_id = sorted(set(stop_ids)) or generation.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(str(tmp))
        write_sharded_safetensors(_unique_tensors(model), tmp)
        processor.save_pretrained(str(tmp))
        processor.image_processor.save_pretrained(str(tmp))
        make_tokenizer_portable(tmp)
    log.info("wrote LlavaNext folder %s", out)
    return out
