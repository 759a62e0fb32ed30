"""The loop's building blocks: sampler position, skipped samples, freezing, per-part learning rates,
and token-normalised loss under gradient accumulation."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_ndino.config import load_config
from llava_ndino.data.dataset import Collator, EncodedDataset, JsonRecords, ResumableSampler, Skipped
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.model.loading import build_model
from llava_ndino.synthetic.shapes import ShapesRecords
from llava_ndino.train.loop import SkipTracker
from llava_ndino.train.losses import label_positions, token_loss_sum
from llava_ndino.train.parts import apply_trainable, param_groups
from llava_ndino.train.tasks.registry import make_task

TINY = ["recipe=demo", "output_dir=unused", "model.tiny.hidden_size=64", "data.synthetic.image_size=112"]


@pytest.fixture(scope="module")
def tiny_vlm():
    cfg = load_config(TINY)
    model, processor = build_model(cfg.model, seed=0)
    return cfg, model, processor


def test_sampler_resumes_mid_epoch_and_splits_ranks() -> None:
    full = list(islice(iter(ResumableSampler(10, seed=3)), 25))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert full[:10] != full[10:20], "each epoch gets a new permutation"
    assert list(islice(iter(ResumableSampler(10, seed=3, start=13)), 12)) == full[13:25]
    rank0 = list(islice(iter(ResumableSampler(10, seed=3, rank=0, world_size=2)), 5))
    rank1 = list(islice(iter(ResumableSampler(10, seed=3, rank=1, world_size=2)), 5))
    assert rank0 == full[0:10:2] and rank1 == full[1:10:2]


def test_collator_drops_and_reports_bad_samples(tiny_vlm, tmp_path: Path) -> None:
    _, _, processor = tiny_vlm
    records = [
        {
            "id": "ok",
            "conversations": [{"from": "human", "value": "Ciao"}, {"from": "gpt", "value": "Salve"}],
        },
        {
            "id": "noimg",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nCosa?"}, {"from": "gpt", "value": "x"}],
        },
        {"id": "noans", "conversations": [{"from": "human", "value": "Ciao"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    dataset = EncodedDataset(JsonRecords(path), ConversationEncoder(processor, "llama3", 512, tmp_path))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch.num_raw == 3 and batch.tensors["input_ids"].shape[0] == 1
    assert {(s.sample_id, s.reason) for s in batch.skipped} == {
        ("noimg", "missing_image"),
        ("noans", "no_assistant"),
    }

    tracker = SkipTracker(tmp_path, max_ratio=0.5, dataset_size=3, enabled=True)
    with pytest.raises(RuntimeError, match="max_skip_ratio"):
        tracker.update(batch)
    listed = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {r["id"] for r in listed} == {"noimg", "noans"}


def test_skip_tracker_tolerates_ratio_below_limit(tmp_path: Path) -> None:
    tracker = SkipTracker(tmp_path, max_ratio=0.2, dataset_size=10, enabled=False)
    from llava_ndino.data.dataset import Batch

    tracker.update(Batch({"x": torch.zeros(1)}, num_raw=10, skipped=[Skipped("a", "missing_image", "m")]))
    assert tracker.state() == {"seen": 10, "reasons": {"missing_image": 1}}


@pytest.mark.parametrize("patch", [14, 28])
def test_tiny_patch_size_reaches_tower_processor_and_forward(patch: int) -> None:
    cfg = load_config([*TINY, f"model.tiny.patch_size={patch}"])
    model, processor = build_model(cfg.model, seed=0)
    side = 112 // patch
    assert model.config.vision_config.patch_size == processor.patch_size == patch
    assert model.config.image_seq_length == side * side
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    batch = processor(images=[image], text=["<image> Di che colore è il cerchio?"], return_tensors="pt")
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    # A square tile-sized image: the base tile, then the two half-padded grid tiles unpadded back to
    # the image's side x side patches, and a newline per grid row.
    assert image_tokens == 2 * side * side + side
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_freezing_and_per_part_learning_rates(tiny_vlm) -> None:
    cfg, model, _ = tiny_vlm
    apply_trainable(model, ["projector", "vision"])
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert not model.model.image_newline.requires_grad
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    train = cfg.train
    train.lr, train.lr_vision, train.weight_decay = 1e-5, 2e-6, 0.1
    groups = {g["name"]: g for g in param_groups(model, train)}
    assert set(groups) == {"vision", "vision_no_decay", "projector", "projector_no_decay"}
    assert groups["vision"]["lr"] == 2e-6 and groups["projector"]["lr"] == 1e-5
    assert groups["vision_no_decay"]["weight_decay"] == 0.0 and groups["vision"]["weight_decay"] == 0.1
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    expected = sum(
        p.numel()
        for m in (model.model.vision_tower, model.model.multi_modal_projector)
        for p in m.parameters()
    )
    assert trainable == expected
    with pytest.raises(ValueError, match="unknown trainable"):
        apply_trainable(model, ["projecter"])


def test_accumulated_loss_equals_one_big_batch(tiny_vlm) -> None:
    """Token-normalised loss: 2 micro-batches of 2 give the gradient of 1 batch of 4."""
    _, model, processor = tiny_vlm
    apply_trainable(model, ["projector", "llm", "vision", "newline"])
    dataset = EncodedDataset(
        ShapesRecords(4, seed=5, image_size=112), ConversationEncoder(processor, "llama3", 1024)
    )
    collate = Collator(processor.tokenizer.pad_token_id)
    samples = [dataset[i] for i in range(4)]
    samples[1].input_ids, samples[1].labels = samples[1].input_ids[:-1], samples[1].labels[:-1]

    def grads(micro_batches):
        model.zero_grad()
        total = sum(int((b.tensors["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        for batch in micro_batches:
            inputs = {k: v for k, v in batch.tensors.items() if k != "labels"}
            loss = token_loss_sum(model(**inputs).logits, batch.tensors["labels"])
            (loss / total).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads([collate(samples)])
    split = grads([collate(samples[:2]), collate(samples[2:])])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)


def test_loss_on_label_positions_only_equals_full_logits(tiny_vlm) -> None:
    """The task's loss computes logits only where a label follows; loss and gradients are unchanged."""
    cfg, model, processor = tiny_vlm
    apply_trainable(model, ["projector", "llm", "vision", "newline"])
    dataset = EncodedDataset(
        ShapesRecords(3, seed=7, image_size=112), ConversationEncoder(processor, "llama3", 1024)
    )
    samples = [dataset[i] for i in range(3)]
    samples[2].labels = torch.full_like(samples[2].labels, -100)  # a row with no answer at all
    batch = Collator(processor.tokenizer.pad_token_id)(samples).tensors
    positions = label_positions(batch["labels"])
    assert 0 < len(positions) < batch["labels"].shape[1] - 1

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    full = loss_and_grads(lambda: token_loss_sum(model(**inputs).logits, batch["labels"]))
    task = make_task(cfg)
    kept = loss_and_grads(lambda: task.loss_sum(model, batch)[0])
    torch.testing.assert_close(kept[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept[1], full[1], rtol=1e-5, atol=1e-7)
    assert model(**inputs, logits_to_keep=positions).logits.shape[1] == len(positions)


def test_chunked_loss_equals_one_pass(tiny_vlm, monkeypatch) -> None:
    """Above LOSS_CHUNK_ABOVE positions the loss runs chunk by chunk (ChunkedCrossEntropy); loss and
    gradients equal the one-pass loss (forced here with tiny chunks, uneven last chunk included)."""
    from llava_ndino.train import losses as tasks

    cfg, model, processor = tiny_vlm
    apply_trainable(model, ["projector", "llm", "vision", "newline"])
    dataset = EncodedDataset(
        ShapesRecords(2, seed=3, image_size=112), ConversationEncoder(processor, "llama3", 1024)
    )
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(2)]).tensors
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def loss_and_grads():
        model.zero_grad()
        loss = token_loss_sum(model(**inputs).logits, batch["labels"])
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one_pass = loss_and_grads()
    monkeypatch.setattr(tasks, "LOSS_CHUNK_ABOVE", 8)
    monkeypatch.setattr(tasks, "LOSS_CHUNK", 7)
    applied = []
    original = tasks.ChunkedCrossEntropy.apply
    monkeypatch.setattr(tasks.ChunkedCrossEntropy, "apply", lambda *a: applied.append(a[2]) or original(*a))
    chunked = loss_and_grads()
    assert applied == [7]
    torch.testing.assert_close(chunked[0], one_pass[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[1], one_pass[1], rtol=1e-5, atol=1e-7)
