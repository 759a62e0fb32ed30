"""LLaVA ``mm_projector.bin`` import/export: every key-prefix variant, shape and key errors, safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

from llava_ndino.model.projector import load_projector_into, read_projector_file, save_projector

VISION, TEXT = 8, 12


def make_projector(vision: int = VISION, text: int = TEXT, seed: int = 0) -> LlavaNextMultiModalProjector:
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=text, num_attention_heads=2, num_key_value_heads=2),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    projector = LlavaNextMultiModalProjector(config)
    with torch.no_grad():
        for p in projector.parameters():
            p.normal_()
    return projector


def llava_state(projector, prefix: str) -> dict[str, torch.Tensor]:
    """The projector's weights under LLaVA's Sequential indices (0, 2) with ``prefix``."""
    index = {"linear_1": "0", "linear_2": "2"}
    state = {}
    for key, value in projector.state_dict().items():
        module, kind = key.split(".")
        state[f"{prefix}{index[module]}.{kind}"] = value.clone()
    return state


def hf_state(projector, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.clone() for k, v in projector.state_dict().items()}


def assert_same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "state_fn",
    [
        lambda p: llava_state(p, "model.mm_projector."),
        lambda p: llava_state(p, "mm_projector."),
        lambda p: llava_state(p, ""),
        lambda p: hf_state(p, "multi_modal_projector."),
        lambda p: hf_state(p, "model.multi_modal_projector."),
    ],
    ids=[
        "model.mm_projector.0",
        "mm_projector.0",
        "0",
        "multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_1",
    ],
)
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_prefix_variants_load(tmp_path, state_fn, suffix):
    source = make_projector(seed=1)
    state = state_fn(source)
    path = tmp_path / f"projector{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    target = make_projector(seed=2)
    load_projector_into(target, path)
    assert_same(target, source)


def test_full_llava_checkpoint_keeps_only_the_projector(tmp_path):
    source = make_projector(seed=3)
    state = llava_state(source, "model.mm_projector.")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    state["model.vision_tower.vision_tower.encoder.layers.0.weight"] = torch.zeros(2)
    state["model.embed_tokens.weight"] = torch.zeros(3, 2)
    path = tmp_path / "full.bin"
    torch.save(state, str(path))
    target = make_projector(seed=4)
    load_projector_into(target, path)
    assert_same(target, source)


def test_save_projector_writes_llava_keys_and_round_trips(tmp_path):
    source = make_projector(seed=5)
    path = tmp_path / "mm_projector.bin"
    save_projector(source, path)
    assert sorted(read_projector_file(path)) == [
        "model.mm_projector.0.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.mm_projector.2.weight",
    ]
    target = make_projector(seed=6)
    load_projector_into(target, path)
    assert_same(target, source)


def test_bf16_file_loads_into_fp32_projector(tmp_path):
    source = make_projector(seed=7)
    path = tmp_path / "bf16.bin"
    torch.save(
        {k: v.to(torch.bfloat16) for k, v in llava_state(source, "model.mm_projector.").items()}, str(path)
    )
    target = make_projector(seed=8)
    load_projector_into(target, path)
    assert target.linear_1.weight.dtype == torch.float32
    torch.testing.assert_close(target.linear_1.weight, source.linear_1.weight.to(torch.bfloat16).float())


def test_wrong_shape_names_file_and_key(tmp_path):
    path = tmp_path / "other_tower.bin"
    save_projector(make_projector(vision=16), path)
    with pytest.raises(ValueError) as err:
        load_projector_into(make_projector(), path)
    message = str(err.value)
    assert str(path) in message and "linear_1.weight" in message and "(12, 16)" in message


@pytest.mark.parametrize("drop", ["model.mm_projector.2.weight", "model.mm_projector.0.bias"])
def test_missing_keys_name_the_file(tmp_path, drop):
    state = llava_state(make_projector(), "model.mm_projector.")
    del state[drop]
    path = tmp_path / "partial.bin"
    torch.save(state, str(path))
    with pytest.raises(ValueError) as err:
        load_projector_into(make_projector(), path)
    assert str(path) in str(err.value) and "mlp2x_gelu" in str(err.value)


def test_linear_projector_is_rejected(tmp_path):
    path = tmp_path / "linear.safetensors"
    save_file(
        {
            "model.mm_projector.weight": torch.zeros(TEXT, VISION),
            "model.mm_projector.bias": torch.zeros(TEXT),
        },
        str(path),
    )
    with pytest.raises(ValueError, match="linear.safetensors"):
        load_projector_into(make_projector(), path)


def test_two_projectors_in_one_file_are_ambiguous(tmp_path):
    source = make_projector()
    state = {**llava_state(source, "model.mm_projector."), **hf_state(source, "multi_modal_projector.")}
    path = tmp_path / "both.bin"
    torch.save(state, str(path))
    with pytest.raises(ValueError, match="map to"):
        load_projector_into(make_projector(), path)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        load_projector_into(make_projector(), tmp_path / "nothing.bin")
    path = tmp_path / "tensor.bin"
    torch.save(torch.zeros(3), str(path))
    with pytest.raises(ValueError, match="tensor.bin"):
        load_projector_into(make_projector(), path)
