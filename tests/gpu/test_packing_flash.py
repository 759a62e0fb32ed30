"""GPU only: packed batches through flash-attn varlen (transformers' flash_attention_2 reads the
restarting position ids) give the unpacked loss. Skipped on CPU or without flash-attn."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llava_ndino.config import load_config
from llava_ndino.data.dataset import EncodedDataset
from llava_ndino.data.encode import ConversationEncoder, collate
from llava_ndino.data.packing import model_inputs, pack
from llava_ndino.model.loading import build_model
from llava_ndino.synthetic.shapes import ShapesRecords
from llava_ndino.train.losses import token_loss_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (gpu extra)"),
]


def test_flash_varlen_packed_loss_matches_padded_sdpa() -> None:
    cfg = load_config(["recipe=demo", "output_dir=unused", "model.attn_implementation=flash_attention_2"])
    model, processor = build_model(cfg.model, seed=0)
    model = model.to("cuda", torch.bfloat16)
    encoder = ConversationEncoder(processor, "llama3", 2048)
    dataset = EncodedDataset(ShapesRecords(6, seed=1, image_size=160), encoder)
    samples = [dataset[i] for i in range(6)]
    padded = {k: v.cuda() for k, v in collate(samples, processor.tokenizer.pad_token_id).items()}
    packed = {k: v.cuda() for k, v in pack(samples, processor.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        flash = token_loss_sum(model(**model_inputs(packed), use_cache=False).logits, packed["labels"])
        model.set_attn_implementation("sdpa")
        reference = token_loss_sum(model(**model_inputs(padded), use_cache=False).logits, padded["labels"])
    torch.testing.assert_close(flash, reference, rtol=2e-2, atol=0.0)
