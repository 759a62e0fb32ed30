"""open_clip tower loading and open_clip -> HF CLIPVisionModel conversion, on tiny random models (CPU, offline)."""

from __future__ import annotations

import json
import logging
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from llava_ndino.model.openclip_tower import (
    load_openclip_as_hf,
    load_openclip_model,
    openclip_to_hf_clip_vision,
    write_tiny_openclip,
)

TINY_NAME = "ndino-test-tiny-ViT"
TINY_CFG = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 56, "patch_size": 14, "width": 48, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def _jittered_clip(quick_gelu: bool = True, seed: int = 1, **vision_overrides) -> torch.nn.Module:
    """A tiny open_clip CLIP with every parameter perturbed (so norms and biases are not trivial)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=TINY_CFG["embed_dim"],
        vision_cfg={**TINY_CFG["vision_cfg"], **vision_overrides},
        text_cfg=TINY_CFG["text_cfg"],
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _openclip_penultimate_patches(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip features after all but the last block, CLS dropped, computed with open_clip's own modules."""
    tokens = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(images.shape[0], 1, -1)
    tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    return tokens[:, 1:]


def _assert_parity(oc_model: torch.nn.Module, hf_model: torch.nn.Module, image_size: int) -> None:
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = _openclip_penultimate_patches(oc_model.visual, images)
        out = hf_model(pixel_values=images, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-2][:, 1:], expected, rtol=0, atol=1e-5)
        pooled = out.pooler_output @ oc_model.visual.proj
        torch.testing.assert_close(pooled, oc_model.encode_image(images), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_openclip(tmp_path_factory.mktemp("oc") / "tiny", image_size=56)


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    config_file = tmp_path_factory.mktemp("oc_cfg") / f"{TINY_NAME}.json"
    config_file.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config_file)
    return TINY_NAME


def test_tiny_folder_is_native_open_clip_and_deterministic(tmp_path):
    folder = write_tiny_openclip(tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    native = open_clip.create_model(f"local-dir:{folder}")
    ours = load_openclip_model(str(folder))
    assert isinstance(ours.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert ours.visual.image_size == (336, 336) and ours.visual.patch_size == (14, 14)
    again = load_openclip_model(f"local-dir:{write_tiny_openclip(tmp_path / 'b')}").state_dict()
    other = load_openclip_model(str(write_tiny_openclip(tmp_path / "c", seed=1))).state_dict()
    for key, value in native.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value) and torch.equal(again[key], value), key
    assert not torch.equal(other["visual.conv1.weight"], native.state_dict()["visual.conv1.weight"])


def test_folder_tower_converts_with_feature_parity(tiny_dir):
    oc_model = load_openclip_model(str(tiny_dir))
    hf_model = openclip_to_hf_clip_vision(oc_model)
    cfg = hf_model.config
    assert cfg.hidden_act == "quick_gelu"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 3, 4)
    assert (cfg.intermediate_size, cfg.image_size, cfg.patch_size, cfg.projection_dim) == (256, 56, 14, 32)
    assert cfg.layer_norm_eps == oc_model.visual.ln_pre.eps
    _assert_parity(oc_model, hf_model, image_size=56)


def test_gelu_tower_converts_with_feature_parity():
    oc_model = _jittered_clip(quick_gelu=False)
    hf_model = openclip_to_hf_clip_vision(oc_model.visual)
    assert hf_model.config.hidden_act == "gelu"
    _assert_parity(oc_model, hf_model, image_size=56)


def _save_visual_only(model, path):
    torch.save({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, path)


def _save_full_safetensors(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _save_torchscript(model, path):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, images):
            return self.visual(images)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Wrapper(), torch.zeros(1, 3, 56, 56)), str(path))


@pytest.mark.parametrize(
    ("file_name", "save"),
    [
        ("visual_only.pt", _save_visual_only),
        ("full.bin", lambda model, path: torch.save(model.state_dict(), path)),
        ("full.safetensors", _save_full_safetensors),
        ("openai_jit.pt", _save_torchscript),
    ],
)
def test_named_architecture_with_local_weights(tiny_name, tmp_path, caplog, file_name, save):
    source = _jittered_clip(seed=3)
    weights = tmp_path / file_name
    save(source, weights)
    with caplog.at_level(logging.INFO, logger="llava_ndino.model.openclip_tower"):
        hf_model = load_openclip_as_hf(tiny_name, weights=weights)
    assert "converted open_clip tower" in caplog.text and "quick_gelu" in caplog.text
    _assert_parity(source, hf_model, image_size=56)
    text_loaded = torch.equal(load_openclip_model(tiny_name, weights).logit_scale, source.logit_scale)
    assert text_loaded == (file_name.startswith("full"))


def test_missing_weights_file_is_named(tiny_name, tiny_dir, tmp_path):
    missing = tmp_path / "ViT-L-14-336-openai.pt"
    with pytest.raises(FileNotFoundError, match="ViT-L-14-336-openai.pt"):
        load_openclip_as_hf(tiny_name, weights=missing)
    with pytest.raises(FileNotFoundError, match="ViT-L-14-336-openai.pt"):
        load_openclip_as_hf(str(tiny_dir), weights=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        load_openclip_model(f"local-dir:{empty}")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_openclip_model(f"local-dir:{tmp_path}")


def test_bad_specs_and_mismatched_keys(tiny_name, tmp_path):
    with pytest.raises(ValueError, match="needs a local weights file"):
        load_openclip_model(tiny_name)
    with pytest.raises(ValueError, match="neither an existing folder nor a known open_clip model"):
        load_openclip_model("ViT-Nope-99", weights=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="downloads are disabled"):
        load_openclip_model("hf-hub:laion/CLIP-ViT-L-14")
    wrong = tmp_path / "other_arch.pt"
    _save_visual_only(_jittered_clip(width=32, head_width=16), wrong)
    with pytest.raises(ValueError, match=r"other_arch\.pt.*wrong shapes"):
        load_openclip_model(tiny_name, weights=wrong)
    renamed = tmp_path / "hf_keys.pt"
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(48)}, renamed)
    with pytest.raises(ValueError, match=r"hf_keys\.pt.*missing"):
        load_openclip_model(tiny_name, weights=renamed)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"ls_init_value": 0.1}, "layer scale"),
        ({"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 4}, "attentional pooling"),
        ({"patch_dropout": 0.5}, "patch dropout"),
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"qk_norm": True}, "CustomResidualAttentionBlock"),
        ({"pool_type": "avg"}, "pool_type"),
        ({"act_kwargs": {"approximate": "tanh"}}, "activation"),
    ],
)
def test_unrepresentable_variants_are_rejected(overrides, reason):
    model = _jittered_clip(quick_gelu=False, **overrides)
    with pytest.raises(NotImplementedError, match=reason):
        openclip_to_hf_clip_vision(model)


def test_non_vit_tower_is_rejected():
    with pytest.raises(NotImplementedError, match="Conv2d"):
        openclip_to_hf_clip_vision(torch.nn.Conv2d(3, 8, 3))
