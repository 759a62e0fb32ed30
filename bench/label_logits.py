"""Training-step time with logits at every position (baseline) against logits only where a label
follows (what the loss does, through ``logits_to_keep``), on the same model and batch.

Two cases: the demo's tiny VLM on a batch of 16 shapes dialogues, and a small text LM with a
32,768-token vocabulary (the head dominates, as LLaMA-3's 128k vocabulary does at scale) on 4 rows
of 1,024 tokens whose last quarter is the answer. Each prints the median step time of both ways, the speed-up, and how many
logit rows each computes. Run:

    OMP_NUM_THREADS=2 .venv/bin/python bench/label_logits.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ndino.config import load_config
from llava_ndino.data.dataset import Collator, EncodedDataset
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.data.packing import model_inputs
from llava_ndino.model.loading import build_model
from llava_ndino.synthetic.shapes import ShapesRecords
from llava_ndino.train.losses import label_positions, token_loss_sum


def _median_seconds(step: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare(name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> None:
    """Time forward+backward of both loss forms on ``batch`` and print the ratio."""
    labels, inputs = batch["labels"], model_inputs(batch)
    positions = label_positions(labels)

    def full() -> None:
        model.zero_grad(set_to_none=True)
        token_loss_sum(model(**inputs, use_cache=False).logits, labels).backward()

    def kept() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        token_loss_sum(logits, labels, positions).backward()

    baseline, ours = _median_seconds(full, repeats), _median_seconds(kept, repeats)
    rows, length = labels.shape
    print(
        f"{name}: every position {baseline * 1000:.0f} ms, label positions {ours * 1000:.0f} ms, "
        f"speed-up {baseline / ours:.2f}x; logit rows {rows * length} -> {rows * len(positions)}"
    )


def main() -> None:
    """Run both cases."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = load_config(["recipe=demo", "output_dir=unused"])
    model, processor = build_model(cfg.model, seed=0)
    encoder = ConversationEncoder(processor, cfg.data.template, cfg.data.max_length)
    dataset = EncodedDataset(
        ShapesRecords(16, seed=0, image_size=cfg.data.synthetic.image_size, dialogues=True), encoder
    )
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(16)]).tensors
    _compare("demo VLM, 16 dialogues", model.train(), batch, args.repeats)

    text = LlamaConfig(
        vocab_size=32768,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    llm = LlamaForCausalLM(text).train()
    ids = torch.randint(0, text.vocab_size, (4, 1024))
    labels = ids.clone()
    labels[:, : 3 * 1024 // 4] = -100
    text_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    _compare("text LM, vocabulary 32k, answers 1/4 of 4x1024 tokens", llm, text_batch, args.repeats)


if __name__ == "__main__":
    main()
