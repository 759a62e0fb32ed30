"""Export of text runs (objectives clm, sft, dpo) as folders that plain transformers and peft load.

- merged (default): an HF causal-LM folder; LoRA/QLoRA adapters are merged into the full-precision
  base (``model.llm``, which must still exist), with the tokenizer, the recipe's chat template and
  a generation config that stops on the template's end-of-turn token;
- ``adapter``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
  ``peft.PeftModel.from_pretrained(base, folder)``, with the tokenizer. When the run added tokens
  (e.g. a pad token), the embedding and output layers are saved too, and the base must first be
  resized to ``len(tokenizer)``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import yaml

from llava_ndino.config import load_config
from llava_ndino.export.folders import atomic_folder, check_output_folder
from llava_ndino.formats.run_dir import CONFIG_FILE, load_model_weights, resolve_resume
from llava_ndino.model.hf_files import mark_tokenizer_portable
from llava_ndino.model.peft_setup import load_text_model

log = logging.getLogger(__name__)

TEXT_OBJECTIVES = ("clm", "sft", "dpo")


def is_text_run(path: Path) -> bool:
    """True when ``path`` is a run or checkpoint directory whose ``config.yaml`` names a text objective."""
    candidate = Path(path) / CONFIG_FILE
    if not candidate.is_file():
        return False
    values = yaml.safe_load(candidate.read_text(encoding="utf-8"))
    return isinstance(values, dict) and values.get("objective") in TEXT_OBJECTIVES


def export_text_run(
    path: Path, out: Path, adapter: bool = False, dtype: str = "auto", force: bool = False
) -> Path:
    """Write the latest checkpoint of run ``path`` (or checkpoint ``path``) to ``out``, atomically."""
    path, out = Path(path), Path(out)
    check_output_folder(out, [path], force)
    checkpoint = resolve_resume(str(path), path)
    cfg = load_config([f"recipe={checkpoint / CONFIG_FILE}"])
    if cfg.objective not in TEXT_OBJECTIVES:
        raise ValueError(
            f"{checkpoint} is a {cfg.objective} run, not a text run ({', '.join(TEXT_OBJECTIVES)})"
        )
    if adapter and not cfg.lora.enabled:
        raise ValueError(
            f"{path} trained every weight (lora.enabled=false): there is no adapter; drop --adapter"
        )
    # merge into (and save adapters for) the full-precision base, never the NF4 one
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype)
    cfg = dataclasses.replace(cfg, model=model_cfg, lora=dataclasses.replace(cfg.lora, quantize="none"))
    model, tokenizer, base_vocab = load_text_model(cfg, load_model_weights(checkpoint))
    sources = [path, checkpoint, *([Path(cfg.model.llm)] if cfg.model.llm else [])]
    with atomic_folder(out, sources, force) as tmp:
        if adapter:
            model.save_pretrained(str(tmp), save_embedding_layers=len(tokenizer) != base_vocab)
        else:
            (model.merge_and_unload() if cfg.lora.enabled else model).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        mark_tokenizer_portable(tmp)
    log.info("wrote %s folder %s from %s", "adapter" if adapter else "merged causal-LM", out, checkpoint)
    return out
