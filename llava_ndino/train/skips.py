"""Counting and listing the samples a run skips, and stopping it when too many are unusable."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from llava_ndino.data.dataset import Batch
from llava_ndino.formats.run_dir import (
    SKIPPED_FILE,
)
from llava_ndino.train.metrics import truncate_jsonl

MIN_SEEN_FOR_SKIP_ABORT = 200

log = logging.getLogger(__name__)


class SkipTracker:
    """Counts and lists skipped samples; aborts above ``max_ratio`` once enough samples were seen."""

    def __init__(self, run_dir: Path, max_ratio: float, dataset_size: int, enabled: bool):
        self.path = run_dir / SKIPPED_FILE
        self.max_ratio, self.enabled = max_ratio, enabled
        self.min_seen = min(MIN_SEEN_FOR_SKIP_ABORT, dataset_size)
        self.seen, self.reasons = 0, Counter()

    def update(self, batch: Batch) -> None:
        """Record one micro-batch (raises RuntimeError above the skip ratio)."""
        self.seen += batch.num_raw
        for item in batch.skipped:
            self.reasons[item.reason] += 1
            if self.enabled:
                with self.path.open("a", encoding="utf-8") as handle:
                    row = {
                        "id": item.sample_id,
                        "reason": item.reason,
                        "message": item.message,
                        "seen": self.seen,
                    }
                    handle.write(json.dumps(row) + "\n")
                if self.reasons[item.reason] == 1:  # the first of each reason in full; the rest are counted
                    log.warning(
                        "skipped %s (further %s skips are counted, and listed in %s)",
                        item.message,
                        item.reason,
                        self.path.name,
                    )
        skipped = sum(self.reasons.values())
        if self.seen >= self.min_seen and skipped > self.max_ratio * self.seen:
            raise RuntimeError(
                f"{skipped} of {self.seen} samples were skipped ({dict(self.reasons)}), above "
                f"data.max_skip_ratio={self.max_ratio}; see {self.path} and fix the data or raise the ratio"
            )

    def state(self) -> dict:
        """JSON-able state for checkpoints."""
        return {"seen": self.seen, "reasons": dict(self.reasons)}

    def load(self, state: dict) -> None:
        """Restore from :meth:`state`, dropping the rows a later, interrupted attempt wrote."""
        self.seen, self.reasons = state["seen"], Counter(state["reasons"])
        self.truncate()

    def truncate(self) -> None:
        """Keep only the rows of samples seen up to the current position (all of them at a fresh start)."""
        if self.enabled:
            truncate_jsonl(self.path, lambda row: row.get("seen", 0) <= self.seen)
