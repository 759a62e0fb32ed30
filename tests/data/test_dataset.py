"""Map-style data (``data.dataset``): the resumable sampler's epochs, resume position and rank split,
and the collator dropping broken samples and reporting them (up to the skip tracker's limit)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from llava_ndino.data.dataset import Collator, EncodedDataset, JsonRecords, ResumableSampler
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.train.skips import SkipTracker


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
