"""Padding-free packing (``data.packing``): packed rows give the unpacked loss and gradients exactly,
positions restart per sample, and rows are planned first-fit decreasing."""

from __future__ import annotations

import pytest
import torch

from llava_ndino.config import load_config
from llava_ndino.data.dataset import Collator, EncodedDataset
from llava_ndino.data.encode import ConversationEncoder, collate
from llava_ndino.data.packing import model_inputs, pack, plan_rows
from llava_ndino.model.loading import build_model
from llava_ndino.synthetic.shapes import ShapesRecords
from llava_ndino.train.losses import token_loss_sum

TINY = ["recipe=demo", "output_dir=unused", "model.tiny.hidden_size=64", "data.synthetic.image_size=112"]


@pytest.fixture(scope="module")
def tiny_vlm():
    cfg = load_config(TINY)
    model, processor = build_model(cfg.model, seed=0)
    return model.float(), processor


def _samples(processor, count: int = 4):
    """Image samples and text-only samples of different lengths."""
    encoder = ConversationEncoder(processor, "llama3", 2048)
    shapes = EncodedDataset(ShapesRecords(count, seed=1, image_size=112), encoder)
    texts = [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": "Dimmi " * (3 + 5 * i)},
                {"from": "gpt", "value": "Va bene " * (2 + 7 * i)},
            ],
        }
        for i in range(2)
    ]
    return [shapes[i] for i in range(count)] + [encoder.encode(t, i) for i, t in enumerate(texts)]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = token_loss_sum(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("capacity", [0, 700])
def test_packed_batch_matches_unpacked_loss_and_gradients(tiny_vlm, capacity) -> None:
    model, processor = tiny_vlm
    model.set_attn_implementation("sdpa")
    samples = _samples(processor)
    pad = processor.tokenizer.pad_token_id
    padded = collate(samples, pad)
    packed = pack(samples, pad, capacity)
    assert packed["input_ids"].shape[0] == (
        1 if capacity == 0 else len(plan_rows([s.input_ids.numel() for s in samples], capacity))
    )
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-5 * max(1.0, float(loss_a.abs())))
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_packing_restarts_positions_and_isolates_samples(tiny_vlm) -> None:
    _, processor = tiny_vlm
    samples = _samples(processor, count=2)
    packed = pack(samples, processor.tokenizer.pad_token_id)
    lengths = [s.input_ids.numel() for s in samples]
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[: len(lengths)] == [sum(lengths[:i]) for i in range(len(lengths))]
    assert (packed["labels"][0, starts] == -100).all()
    assert "attention_mask" not in model_inputs(packed) and "attention_mask" in model_inputs(
        collate(samples, 0)
    )
    batch = Collator(processor.tokenizer.pad_token_id, packing=True)(samples)
    assert float(1 - batch.tensors["attention_mask"].float().mean()) == 0.0


def test_plan_rows_first_fit_decreasing() -> None:
    assert plan_rows([5, 3, 4, 2], 0) == [[0, 1, 2, 3]]
    rows = plan_rows([5, 3, 4, 2, 6], 8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows) and len(rows) == 3
