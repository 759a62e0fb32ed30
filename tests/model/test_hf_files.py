"""Portable HF folders (``model.hf_files``): a scaled LLaMA-3.1 RoPE is also written in transformers
4.x's keys."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlavaNextConfig

from llava_ndino.model import hf_files


def test_scaled_rope_is_written_for_transformers4(tiny_llava_dir: Path, tmp_path: Path) -> None:
    """LLaMA-3.1's ``llama3`` RoPE also gets 4.x's ``rope_scaling``; 5.x still reads the same parameters."""
    config = LlavaNextConfig.from_pretrained(str(tiny_llava_dir)).to_dict()
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 4096}
    config["text_config"]["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_files.make_config_portable(tmp_path)
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert text["rope_theta"] == 500000.0
    assert text["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert LlavaNextConfig.from_pretrained(str(tmp_path)).text_config.rope_parameters == rope
