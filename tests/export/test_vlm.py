"""Export to an HF LlavaNext folder: legacy key layout, plain ``from_pretrained`` parity, checkpoints, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava_ndino.cli import main
from llava_ndino.export import vlm as export
from llava_ndino.export.vlm import save_llava_folder
from llava_ndino.infer import Answerer
from llava_ndino.model.build import assemble_from_folders
from llava_ndino.model.loading import load_trained, save_skeleton
from llava_ndino.train.checkpoint import save_checkpoint

LEGACY_PREFIXES = (
    "vision_tower.vision_model.",
    "multi_modal_projector.",
    "language_model.model.",
    "language_model.lm_head.",
    "image_newline",
)
SIZES_WH = [(200, 100), (100, 300), (336, 336)]
QUESTION = "Cosa c'è di strano in questa immagine?"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run much faster on one thread than on several contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def original(tiny_dirs):
    """An assembled model in memory, with LM/projector weights large enough that answers depend on the input."""
    torch.manual_seed(0)
    model, processor = assemble_from_folders(str(tiny_dirs["vision"]), tiny_dirs["llm"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "vision_tower" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    return model.eval(), processor


@pytest.fixture(scope="module")
def exported(original, tmp_path_factory) -> Path:
    return save_llava_folder(*original, tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES_WH]


def load_plain(folder: Path):
    """Load ``folder`` the way a user of plain transformers would."""
    model, info = LlavaNextForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval(), AutoProcessor.from_pretrained(str(folder))


def forward(model, processor, image: Image.Image) -> tuple[dict, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return inputs, model(**inputs).logits


def assert_same_outputs(original, folder: Path, images: list[Image.Image]) -> None:
    model, processor = load_plain(folder)
    for image in images:
        ref_inputs, ref_logits = forward(*original, image)
        inputs, logits = forward(model, processor, image)
        assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
        assert torch.equal(inputs["pixel_values"], ref_inputs["pixel_values"])
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def safetensors_keys(folder: Path) -> list[str]:
    keys = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys += list(handle.keys())  # noqa: SIM118 - safe_open is not a dict
    return keys


def test_key_layout_is_original_llava_next(original, exported: Path) -> None:
    keys = safetensors_keys(exported)
    assert keys and all(key.startswith(LEGACY_PREFIXES) for key in keys), keys
    vision = [key for key in keys if "vision" in key]
    assert vision and all(key.startswith("vision_tower.vision_model.") for key in vision)
    assert "language_model.lm_head.weight" in keys and "image_newline" in keys
    assert len(keys) == len(set(keys)) == len(original[0].state_dict())  # the tiny LM is untied


def test_folder_is_portable(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert (
        config["text_config"]["rope_theta"]
        == config["text_config"]["rope_parameters"]["rope_theta"]
        == 500000
    )
    tokenizer = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<image>" in tokenizer["additional_special_tokens"]
    assert not isinstance(tokenizer.get("extra_special_tokens"), list)
    flat = json.loads((exported / "preprocessor_config.json").read_text())
    assert flat["image_processor_type"] == "LlavaNextImageProcessor"
    assert (exported / "chat_template.jinja").is_file()
    processor = AutoProcessor.from_pretrained(str(exported))
    vocab = processor.tokenizer.get_vocab()
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted([vocab["<|end_of_text|>"], vocab["<|eot_id|>"]])
    assert generation["pad_token_id"] == processor.tokenizer.pad_token_id == vocab["<pad>"]


def test_plain_transformers_matches_in_memory_model(original, exported: Path, images) -> None:
    assert_same_outputs(original, exported, images)


def test_greedy_answers_are_identical(original, exported: Path, images) -> None:
    items = [(image, QUESTION) for image in images]
    before = Answerer(*original).ask_batch(items, max_new_tokens=8)
    after = Answerer(*load_plain(exported)).ask_batch(items, max_new_tokens=8)
    assert after == before and len(set(before)) > 1


def test_export_run_dir_and_checkpoint(original, images, tmp_path: Path, capsys) -> None:
    model, processor = original
    run_dir = tmp_path / "run"
    save_skeleton(model, processor, run_dir)
    ckpt = save_checkpoint(
        run_dir,
        7,
        model_state=model.state_dict(),
        optimizer_state=None,
        scheduler_state=None,
        trainer_state={},
        config_text="",
        keep_last=0,
    )
    for source, out in ((run_dir, tmp_path / "from_run"), (ckpt, tmp_path / "from_ckpt")):
        main(["export", str(source), "--out", str(out)])
        assert f"wrote LlavaNext folder {out}" in capsys.readouterr().out
        assert_same_outputs(original, out, images[:1])
    reloaded, _ = load_trained(run_dir)
    assert torch.equal(reloaded.model.image_newline, model.model.image_newline)


def test_export_bfloat16(exported: Path, tmp_path: Path) -> None:
    main(["export", str(exported), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    model, _ = load_plain(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_export_loads(original, images, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(export, "SHARD_BYTES", 200_000)
    folder = save_llava_folder(*original, tmp_path / "sharded")
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert sorted(index["weight_map"]) == sorted(safetensors_keys(folder))
    state = original[0].state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert not list(folder.glob("*.tmp"))
    assert_same_outputs(original, folder, images[:1])
