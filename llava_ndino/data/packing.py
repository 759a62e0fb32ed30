"""Padding-free packing: several samples share one row, with attention isolated between them.

A packed batch carries ``position_ids`` that restart at 0 for every sample and no attention mask
for the model. transformers reads the restarts as packed-sequence boundaries: with
``attn_implementation=flash_attention_2`` (GPU, when flash-attn is installed) it runs flash-attn's
varlen kernel on them, and with ``sdpa``/``eager`` (CPU included) it builds the block-diagonal
causal mask, so a packed batch computes exactly what the unpacked samples compute. The
``attention_mask`` kept in the batch marks real tokens for the loop's pad-fraction statistic only.
"""

from __future__ import annotations

import torch

from llava_ndino.data.encode import IGNORE_INDEX, EncodedSample, stack_images


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign samples to rows by first-fit decreasing; ``capacity`` <= 0 puts them all in one row."""
    if capacity <= 0:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


def pack(samples: list[EncodedSample], pad_token_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Pack ``samples`` into rows of at most ``capacity`` tokens (0: one row); see the module docstring.

    Each sample's first label is ignored, so the last token of one sample is never trained to
    predict the first token of the next (unpacked, that label is dropped by the shift anyway).
    Images are reordered to the order of their tokens in the packed rows.
    """
    rows = plan_rows([s.input_ids.numel() for s in samples], capacity)
    width = max(sum(samples[i].input_ids.numel() for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    ordered: list[EncodedSample] = []
    for r, row in enumerate(rows):
        cursor = 0
        for index in row:
            sample = samples[index]
            n = sample.input_ids.numel()
            input_ids[r, cursor : cursor + n] = sample.input_ids
            labels[r, cursor : cursor + n] = sample.labels
            labels[r, cursor] = IGNORE_INDEX
            attention_mask[r, cursor : cursor + n] = 1
            position_ids[r, cursor : cursor + n] = torch.arange(n)
            cursor += n
            ordered.append(sample)
        position_ids[r, cursor:] = torch.arange(width - cursor)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        **stack_images(ordered),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for ``batch``: no labels, and no attention mask when packed."""
    drop = {"labels", "attention_mask"} if "position_ids" in batch else {"labels"}
    return {k: v for k, v in batch.items() if k not in drop}
