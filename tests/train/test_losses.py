"""The loss (``train.losses``): token-normalised under gradient accumulation, logits only at label
positions, and chunked above LOSS_CHUNK_ABOVE positions, each equal to the plain one-pass loss."""

from __future__ import annotations

import torch

from llava_ndino.data.dataset import Collator, EncodedDataset
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.synthetic.shapes import ShapesRecords
from llava_ndino.train import losses
from llava_ndino.train.losses import label_positions, token_loss_sum
from llava_ndino.train.parts import apply_trainable
from llava_ndino.train.tasks.registry import make_task


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
    monkeypatch.setattr(losses, "LOSS_CHUNK_ABOVE", 8)
    monkeypatch.setattr(losses, "LOSS_CHUNK", 7)
    applied = []
    original = losses.ChunkedCrossEntropy.apply
    monkeypatch.setattr(losses.ChunkedCrossEntropy, "apply", lambda *a: applied.append(a[2]) or original(*a))
    chunked = loss_and_grads()
    assert applied == [7]
    torch.testing.assert_close(chunked[0], one_pass[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[1], one_pass[1], rtol=1e-5, atol=1e-7)
