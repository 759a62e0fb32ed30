"""Assembly (``model.build``, `ndino assemble` end to end): the folder it writes is loaded by plain
transformers and behaves like the in-memory assembled model (logits, config, embeddings, generation
stop tokens); the added tokens never reuse an unsafe pad."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

from llava_ndino import cli
from llava_ndino.formats.tokens import END_OF_TEXT, EOT
from llava_ndino.model.build import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    add_vlm_tokens,
    assemble_from_folders,
    hf_pinpoints,
)
from llava_ndino.model.projector import save_projector

SEED = 1234
PINPOINTS_HW = [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]


def assemble_cli(tiny_dirs, out, *extra: str, vision: str | None = None) -> None:
    argv = ["assemble", "--vision", vision or str(tiny_dirs["vision"]), "--llm", str(tiny_dirs["llm"])]
    assert cli.main([*argv, "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def cli_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("assembled") / "model"
    torch.manual_seed(SEED)
    assemble_cli(tiny_dirs, out)
    return out


@pytest.fixture(scope="module")
def in_memory(tiny_dirs):
    """The same assembly in memory, with the same seed (so the random projector/newline match)."""
    torch.manual_seed(SEED)
    model, processor = assemble_from_folders(str(tiny_dirs["vision"]), tiny_dirs["llm"])
    return model.eval(), processor


@pytest.fixture(scope="module")
def loaded(cli_dir):
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        cli_dir, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def processor(cli_dir):
    return AutoProcessor.from_pretrained(cli_dir)


def image_prompt(processor, add_generation_prompt: bool = True):
    image = Image.new("RGB", (300, 200), (30, 160, 90))
    image.paste((240, 240, 0), (0, 0, 150, 100))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Cosa c'è?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt")


def test_loads_without_missing_or_unexpected_keys(loaded):
    _, info = loaded
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_logits_equal_in_memory_model(loaded, processor, in_memory):
    model, _ = loaded
    memory_model, memory_processor = in_memory
    inputs = image_prompt(processor)
    memory_inputs = image_prompt(memory_processor)
    for key in inputs:
        assert torch.equal(inputs[key], memory_inputs[key]), key
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = memory_model(**inputs).logits
    assert logits.dtype == torch.float32
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_config(loaded, processor):
    config = loaded[0].config
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert [list(p) for p in config.image_grid_pinpoints] == PINPOINTS_HW
    assert [list(p) for p in processor.image_processor.image_grid_pinpoints] == PINPOINTS_HW
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert config.image_token_index == processor.image_token_id
    assert config.projector_hidden_act == "gelu"
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.pad_token_id not in (None, 0, *config.text_config.eos_token_id)


def test_hf_pinpoints_scale_with_the_tile():
    assert hf_pinpoints(336) == PINPOINTS_HW
    assert hf_pinpoints(224) == [[h * 2 // 3, w * 2 // 3] for h, w in PINPOINTS_HW]


def test_new_embedding_rows_are_the_mean(loaded, tiny_dirs):
    model, _ = loaded
    llm = LlamaForCausalLM.from_pretrained(tiny_dirs["llm"], dtype=torch.float32)
    for old, new in [
        (llm.get_input_embeddings().weight, model.get_input_embeddings().weight),
        (llm.get_output_embeddings().weight, model.get_output_embeddings().weight),
    ]:
        n_old = old.shape[0]
        assert new.shape[0] == n_old + 2  # <image> and <pad>
        torch.testing.assert_close(new[:n_old], old, atol=0, rtol=0)
        mean = old.mean(dim=0)
        for row in new[n_old:]:
            torch.testing.assert_close(row, mean)


def test_padded_vocabulary_is_kept_not_shrunk(tiny_dirs, tmp_path):
    """An LLM with spare embedding rows (like LLaVA-NeXT-8B's 128320 for 128256 tokens) keeps them all."""
    from llava_ndino.model.build import resize_embeddings_to_mean

    llm = LlamaForCausalLM.from_pretrained(tiny_dirs["llm"], dtype=torch.float32)
    rows = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(rows + 64, mean_resizing=False)
    padded = llm.get_input_embeddings().weight.detach().clone()
    llm.save_pretrained(tmp_path / "llm")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dirs["llm"] / name).is_file():
            shutil.copy(tiny_dirs["llm"] / name, tmp_path / "llm" / name)
    model, processor = assemble_from_folders(str(tiny_dirs["vision"]), tmp_path / "llm")
    assert len(processor.tokenizer) < rows + 64
    assert model.config.image_token_index < rows + 64
    torch.testing.assert_close(model.get_input_embeddings().weight, padded, atol=0, rtol=0)
    resize_embeddings_to_mean(llm, rows + 65)
    assert llm.get_input_embeddings().weight.shape[0] == rows + 65


def test_generation_config_stops_on_eot(cli_dir, loaded, processor):
    tok = processor.tokenizer
    eot, end = tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(END_OF_TEXT)
    for config in (GenerationConfig.from_pretrained(cli_dir), loaded[0].generation_config):
        assert {eot, end} <= set(config.eos_token_id)
        assert config.pad_token_id == tok.pad_token_id


def test_greedy_generate_stops_at_eot(cli_dir, processor):
    model = LlavaNextForConditionalGeneration.from_pretrained(cli_dir, dtype=torch.float32).eval()
    eot = processor.tokenizer.convert_tokens_to_ids(EOT)
    # random weights never choose eot on their own: make it the argmax at every step
    head = model.lm_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[eot] = 1.0
    inputs = image_prompt(processor)
    prompt_len = inputs["input_ids"].shape[1]
    max_new = 6
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    assert out[0, -1].item() == eot
    assert out.shape[1] - prompt_len < max_new
    # the failure this guards against: stopping only on <|end_of_text|> never stops
    with torch.no_grad():
        runaway = model.generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=processor.tokenizer.convert_tokens_to_ids(END_OF_TEXT),
        )
    assert runaway.shape[1] - prompt_len == max_new


def test_assemble_openclip_tower(tiny_dirs, tmp_path):
    from llava_ndino.model.openclip_tower import load_openclip_as_hf

    out = tmp_path / "oc"
    assemble_cli(tiny_dirs, out, vision=f"openclip:{tiny_dirs['openclip']}")
    model, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    converted = load_openclip_as_hf(str(tiny_dirs["openclip"])).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert set(tower) == set(converted)
    for key, value in converted.items():
        assert torch.equal(tower[key], value), key
    processor = AutoProcessor.from_pretrained(out)
    with torch.no_grad():
        logits = model(**image_prompt(processor)).logits
    assert torch.isfinite(logits).all()


def test_openclip_pixel_statistics_reach_the_processor(tiny_dirs, tmp_path):
    folder = tmp_path / "openclip"
    shutil.copytree(tiny_dirs["openclip"], folder)
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    config_path.write_text(json.dumps(config))
    _, processor = assemble_from_folders(f"openclip:{folder}", tiny_dirs["llm"])
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert list(processor.image_processor.image_std) == [0.25, 0.25, 0.25]


def test_base_llm_that_stops_only_on_end_of_text(tiny_dirs, tmp_path):
    """LLaMA-3 base models ship eos = <|end_of_text|> only; the assembled model must also stop on eot."""
    llm = tmp_path / "llm"
    shutil.copytree(tiny_dirs["llm"], llm)
    generation_path = llm / "generation_config.json"
    generation = json.loads(generation_path.read_text())
    end = generation["eos_token_id"][0]
    generation["eos_token_id"] = end
    generation_path.write_text(json.dumps(generation))
    model, processor = assemble_from_folders(str(tiny_dirs["vision"]), llm)
    eot = processor.tokenizer.convert_tokens_to_ids(EOT)
    assert end == processor.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert model.generation_config.eos_token_id == [end, eot]
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_assemble_with_projector_file_round_trips(tiny_dirs, loaded, tmp_path):
    torch.manual_seed(7)
    projector = LlavaNextMultiModalProjector(loaded[0].config)
    with torch.no_grad():
        for p in projector.parameters():
            p.normal_()
    path = tmp_path / "mm_projector.bin"
    save_projector(projector, path)
    out = tmp_path / "with_projector"
    assemble_cli(tiny_dirs, out, "--projector", str(path))
    model = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    got = model.model.multi_modal_projector.state_dict()
    for key, value in projector.state_dict().items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("bad_pad", [None, "eos", "bos", "id0"])
def test_add_vlm_tokens_replaces_unsafe_pad(tiny_dirs, bad_pad):
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    if bad_pad == "eos":
        tok.pad_token = tok.eos_token
    elif bad_pad == "bos":
        tok.pad_token = tok.bos_token
    elif bad_pad == "id0":
        tok.pad_token = tok.convert_ids_to_tokens(0)
    add_vlm_tokens(tok)
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id not in {
        0,
        tok.eos_token_id,
        tok.bos_token_id,
        tok.convert_tokens_to_ids(END_OF_TEXT),
    }
    assert tok.convert_tokens_to_ids("<image>") not in {tok.pad_token_id, tok.unk_token_id}
