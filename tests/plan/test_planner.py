"""The memory planner (``plan.planner``, `ndino plan`): activation formulas against autograd, engine
trends, the loss terms, and the printed table, flags, errors and help."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llava_ndino import cli
from llava_ndino.plan.dimensions import PRESETS, TextShape, VisionShape
from llava_ndino.plan.planner import (
    CONTEXT_BYTES,
    CPU_FP32,
    ENGINES,
    GIB,
    Precision,
    Workload,
    activation_parts,
    estimate,
    text_layer_bytes,
    vision_layer_bytes,
)
from llava_ndino.train.losses import LOSS_CHUNK, LOSS_CHUNK_ABOVE

BF16 = Precision.for_gpu(2)
ALL = {"vision", "projector", "llm", "newline"}
WORK = Workload(rows=4, row_tokens=8192, images=4)
ROW = re.compile(
    r"^([* ]) (\w+)\s+(yes|no)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(yes|no)$"
)


def _saved_bytes(run, module: torch.nn.Module, shared: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes, except parameters and
    the ``shared`` tensors (made once per model, not per layer)."""
    params = {p.untyped_storage().data_ptr() for p in [*module.parameters(), *shared]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())


@pytest.mark.parametrize("trains", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_decoder_layer_formula_matches_autograd(trains, masked):
    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=8, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).requires_grad_(trains)
    tokens = 256
    position = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(tokens)[None])
    mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool).tril() if masked else None
    x = torch.randn(1, tokens, 128, requires_grad=True) * 1.0
    measured = _saved_bytes(
        lambda: layer(x, attention_mask=mask, position_embeddings=position), layer, position
    )
    # without a mask SDPA runs GQA natively, which the planner models as its flash_attention_2 case
    work = Workload(rows=1, row_tokens=tokens, images=0, attn="sdpa" if masked else "flash_attention_2")
    predicted = text_layer_bytes(TextShape.from_config(config), work, a=4, trains=trains)
    assert predicted == pytest.approx(measured, rel=0.01)  # the rest: softmax and RMSNorm statistics


def test_vision_layer_formula_matches_autograd():
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=112)
    config._attn_implementation = "sdpa"
    layer = CLIPEncoderLayer(config)
    shape = VisionShape.from_config(config)
    x = torch.randn(5, shape.tokens_per_tile, 64, requires_grad=True) * 1.0
    measured = _saved_bytes(lambda: layer(x, None), layer)
    assert vision_layer_bytes(shape, tiles=5, a=4, attn="sdpa") == pytest.approx(measured, rel=0.01)


def test_zero3_per_gpu_total_falls_with_gpus_and_ddp_does_not():
    shape = PRESETS["ndino-8b"]
    totals = {
        engine: [estimate(shape, ALL, WORK, BF16, engine, True, gpus).total for gpus in (1, 8, 64)]
        for engine in ("ddp", "zero3")
    }
    assert totals["zero3"][0] > totals["zero3"][1] > totals["zero3"][2]
    assert totals["ddp"][0] == totals["ddp"][1] == totals["ddp"][2]
    zero3 = estimate(shape, ALL, WORK, BF16, "zero3", True, 8)
    trained = sum(shape.part_params().values())
    assert zero3.params == trained * 2 / 8
    assert zero3.optimizer == trained * 12 / 8


def test_checkpointing_lowers_activations():
    shape = PRESETS["ndino-8b"]
    for trainable in (ALL, {"projector"}):
        off = estimate(shape, trainable, WORK, BF16, "zero3", False, 8)
        on = estimate(shape, trainable, WORK, BF16, "zero3", True, 8)
        assert on.activations < off.activations
        assert on.params == off.params


def test_offload_lowers_gpu_memory_and_raises_host_memory():
    shape = PRESETS["ndino-8b"]
    for engine in ("zero2", "zero3"):
        plain = estimate(shape, ALL, WORK, BF16, engine, True, 8)
        offload = estimate(shape, ALL, WORK, BF16, f"{engine}_offload", True, 8)
        assert offload.total < plain.total
        assert plain.host == 0 < offload.host
    trained = sum(shape.part_params().values())
    assert estimate(shape, ALL, WORK, BF16, "zero3_offload", True, 8).host == trained * (12 + 4 + 2) / 8


def test_loss_and_layer_terms_scale_as_counted():
    shape = PRESETS["ndino-8b"]
    vocab = shape.text.vocab
    short = Workload(rows=1, row_tokens=LOSS_CHUNK_ABOVE, images=1)  # one-pass loss: 3 fp32 copies
    parts = activation_parts(shape, ALL, short, BF16, checkpointing=True)
    assert parts["log-probs"] == 4 * short.tokens * vocab
    assert (
        parts["backward peak"] == 8 * short.tokens * vocab
    )  # the loss gradients exceed one layer's recompute
    tokens = WORK.tokens  # above LOSS_CHUNK_ABOVE: chunked, the gradient in bf16 plus one fp32 chunk
    parts = activation_parts(shape, ALL, WORK, BF16, checkpointing=True)
    assert parts["log-probs"] == 2 * tokens * vocab
    assert parts["backward peak"] == 2 * tokens * vocab + 8 * LOSS_CHUNK * vocab
    kept_inputs = 32 * 2 * 4096 * tokens + 24 * 2 * 1024 * WORK.images * 5 * 577
    assert parts["layers"] > kept_inputs
    ddp = estimate(shape, ALL, WORK, CPU_FP32, "ddp", False, 1)
    assert ddp.other == ddp.grads + CONTEXT_BYTES  # DDP's buckets copy the gradients


def test_logit_fraction_scales_only_the_loss_terms():
    """The loss keeps logits at label positions only; logit_fraction says which share that is."""
    shape = PRESETS["ndino-8b"]
    full = activation_parts(shape, ALL, WORK, BF16, checkpointing=False)
    quarter = activation_parts(shape, ALL, replace(WORK, logit_fraction=0.25), BF16, checkpointing=False)
    assert quarter["log-probs"] == full["log-probs"] / 4
    chunk = 8 * LOSS_CHUNK * shape.text.vocab  # both are chunked: the fp32 chunk does not scale
    assert quarter["backward peak"] - chunk == (full["backward peak"] - chunk) / 4
    assert quarter["layers"] == full["layers"]


def test_cli_logit_fraction_lowers_the_estimate(capsys):
    args = ("recipe=demo", "model_preset=ndino-8b", "data.max_length=4096", "train.per_device_batch_size=1")
    _, upper, _ = _plan(capsys, *args)
    _, lower, _ = _plan(capsys, *args, "logit_fraction=0.2")
    assert "logits at 100% of positions (logit_fraction=1, the upper bound" in upper
    assert "logits at 20% of positions (logit_fraction=0.2)" in lower
    totals = [[float(m[9]) for m in _rows(text)] for text in (upper, lower)]
    assert all(low < high for low, high in zip(totals[1], totals[0], strict=True))


def _rows(text: str) -> list[re.Match]:
    return [m for line in text.splitlines() if (m := ROW.match(line))]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_a_table_for_the_demo(capsys):
    code, out, _ = _plan(capsys, "recipe=demo", "gpus=8")
    assert code == 0
    rows = _rows(out)
    assert [(m[2], m[3]) for m in rows] == [(e, c) for e in ENGINES for c in ("no", "yes")]
    assert [m[2] for m in rows if m[1] == "*"] == ["ddp"]  # engine single, no checkpointing
    assert "tiny model the recipe builds" in out
    assert "global batch: 16 per GPU x 1 accumulation x 8 GPUs = 128 samples" in out
    assert "recommendation: ddp without gradient checkpointing" in out


@pytest.mark.parametrize("limit", [20, 80, 10_000])
def test_fits_flags_respect_gpu_mem_gb(capsys, limit):
    _, out, _ = _plan(capsys, "recipe=demo", "gpus=8", "model_preset=ndino-8b", "data.max_length=4096",
                      "train.per_device_batch_size=1", f"gpu_mem_gb={limit}")  # fmt: skip
    rows = _rows(out)
    assert len(rows) == 10
    for m in rows:
        assert m[10] == ("yes" if float(m[9]) <= limit else "no")
    assert {m[10] for m in rows} == ({"yes"} if limit == 10_000 else {"yes", "no"})


def test_cli_falls_back_to_the_preset_for_missing_folders(capsys, tmp_path: Path):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text(
        "output_dir: runs/x\nengine: zero3\nmodel:\n  source: components\n"
        f"  vision: {tmp_path}/no-clip\n  llm: {tmp_path}/no-llama\n  dtype: bfloat16\n"
        "data:\n  max_length: 4096\ntrain:\n  max_steps: 10\n  per_device_batch_size: 1\n"
        "  gradient_checkpointing: true\n  trainable: [vision, projector, llm, newline]\n"
    )
    code, out, _ = _plan(capsys, f"recipe={recipe}", "gpus=16", "gpu_mem_gb=64")
    assert code == 0
    assert f"ndino-8b preset (model.vision={tmp_path}/no-clip not found)" in out
    assert f"ndino-8b preset (model.llm={tmp_path}/no-llama not found)" in out
    rows = _rows(out)
    assert [m[2] for m in rows if m[1] == "*"] == ["zero3"]
    zero3 = next(m for m in rows if m[1] == "*")
    assert float(zero3[4]) == pytest.approx(8_354_768_896 * 2 / 16 / GIB, abs=0.05)  # weights / 16 GPUs
    assert "host RAM per node (4 ranks)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpus=0"], "gpus must be a whole number >= 1"),
        (["gpus=eight"], "gpus must be a whole number >= 1"),
        (["gpu_mem_gb=-3"], "gpu_mem_gb must be a number > 0"),
        (["model_preset=llama-70b"], "unknown model_preset 'llama-70b': choose from ndino-8b"),
        (["lora.enabled=true"], "LoRA/QLoRA adapters"),
        (["logit_fraction=0"], "logit_fraction must be a number > 0"),
        (["logit_fraction=1.5"], "logit_fraction is a share of positions in (0, 1]"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_error(capsys, args, message):
    code, _, err = _plan(capsys, "recipe=demo", *args)
    assert code == 2
    assert message in err


def test_plan_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in ("gpus=N", "gpus_per_node=N", "gpu_mem_gb=G", "model_preset=ndino-8b", "recipe=long_it"):
        assert key in text
