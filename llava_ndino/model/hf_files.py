"""Portable HF folders: the rules that let transformers 4.x and 5.x both load what 5.x writes.

- 5.x names ``TokenizersBackend`` as the tokenizer class, which 4.x cannot import;
- 5.x lists extra special tokens under ``extra_special_tokens`` where 4.x expects a dict;
- 5.x keeps RoPE only under ``rope_parameters``, which 4.x ignores (falling back to theta 10000).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlavaNextForConditionalGeneration


def mark_tokenizer_portable(folder: Path) -> None:
    """Name ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``, which transformers 4.x and 5.x both know.

    transformers 5 writes ``TokenizersBackend``, a class 4.x cannot import.
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_config_portable(folder: Path) -> None:
    """Add the 4.x spelling of 5.x-only fields to ``folder/config.json`` (5.x reads both).

    transformers 5 stores RoPE as ``text_config.rope_parameters`` only; 4.x ignores that and silently
    falls back to ``rope_theta=10000`` (LLaMA-3 needs 500000), so ``rope_theta`` and, for scaled RoPE
    (LLaMA-3.1's ``llama3``), ``rope_scaling`` are written beside it.
    """
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("architectures", [LlavaNextForConditionalGeneration.__name__])
    text = config.get("text_config") or {}
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            text["rope_scaling"] = scaling
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tokenizer_portable(folder: Path) -> None:
    """Make ``folder/tokenizer_config.json`` loadable by transformers 4.x as well as 5.x.

    Besides the tokenizer class (see :func:`mark_tokenizer_portable`), 5.x writes extra special
    tokens such as ``<image>`` as a list under ``extra_special_tokens``, where 4.x expects a dict
    and crashes; both versions read a list under ``additional_special_tokens``.
    """
    mark_tokenizer_portable(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        known = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = known + [t for t in extra if t not in known]
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
