"""Training metrics: JSONL and tensorboard logging, throughput and model FLOPs utilisation (MFU).

FLOPs follow torchtitan's count: 6·N per language-model token (image tokens included) plus
12·L·H·Q·T for attention, plus the vision tower's forward (2·N_vit per patch token), tripled when
the tower trains. MFU divides by the chip's dense bf16 peak; on CPU it is not reported.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llava_ndino.formats.run_dir import METRICS_FILE
from llava_ndino.train.engine import Engine

# dense bf16 peak FLOP/s by device-name fragment
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def peak_flops() -> float | None:
    """Return the dense bf16 peak of the current CUDA device, or None (CPU or unknown chip)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def numel(param: torch.Tensor) -> int:
    """Elements of ``param``; under DeepSpeed ZeRO-3 its full size (``ds_numel``), not the empty local shard."""
    return getattr(param, "ds_numel", None) or param.numel()


def _count(module: nn.Module) -> int:
    return sum(numel(p) for p in module.parameters())


def lm_flops(
    lm_params: int, text_cfg, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> float:
    """Forward + backward FLOPs of a language model with ``lm_params`` non-embedding parameters over a batch.

    Attention counts each token against its row length, or, for packed rows (``position_ids``
    restarting at 0 per sample), against its own sample's length.
    """
    tokens = int(attention_mask.sum())
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    per_pair = 12 * text_cfg.num_hidden_layers * text_cfg.num_attention_heads * head_dim
    if position_ids is None:
        attended = tokens * attention_mask.shape[1]
    else:
        starts = (position_ids.flatten() == 0).nonzero().flatten().tolist() + [position_ids.numel()]
        attended = sum((end - start) ** 2 for start, end in itertools.pairwise(starts))
    return float(6 * lm_params * tokens + per_pair * attended)


def flops_per_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training micro-batch (forward + backward) of a LlavaNext model."""
    inner = model.model
    text_cfg = model.config.get_text_config()
    lm_params = _count(inner.language_model) - numel(inner.language_model.get_input_embeddings().weight)
    lm_params += _count(model.lm_head)
    flops = lm_flops(lm_params, text_cfg, batch["attention_mask"], batch.get("position_ids"))
    pixels = batch.get("pixel_values")
    if pixels is not None:
        vcfg = model.config.vision_config
        patch_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        tiles = pixels.shape[0] * pixels.shape[1]
        trains = any(p.requires_grad for p in inner.vision_tower.parameters())
        flops += (6 if trains else 2) * _count(inner.vision_tower) * patch_tokens * tiles
    return float(flops)


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite the JSONL file at ``path`` with only the rows ``keep`` accepts (atomically); returns how
    many rows were dropped. Lines that are not JSON objects (a torn last line) are dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and keep(row):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Appends one JSON line per logging step to ``metrics.jsonl`` and mirrors scalars to tensorboard.

    A run that resumes at step ``start`` first drops the rows (and tensorboard events) after ``start``
    that the interrupted attempt wrote, so redone steps are not recorded twice.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            truncate_jsonl(self.path, lambda row: row.get("step", 0) <= start)
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, values: dict[str, float | int | None]) -> None:
        """Write ``values`` for ``step`` (None values go to JSONL only)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close tensorboard."""
        if self.writer is not None:
            self.writer.close()


class Window:
    """Sums over the steps since the last log line; each rank keeps its own and they are reduced at log time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new logging window."""
        self.sums: Counter[str] = Counter(
            dict.fromkeys(("loss", "targets", "tokens", "padded", "samples", "flops", "logits"), 0)
        )
        self.steps = 0
        self.start = time.perf_counter()

    def add_batch(self, batch: dict[str, torch.Tensor], flops: float, logits: int) -> None:
        """Count a micro-batch's real tokens, padded size, samples, FLOPs and positions with logits."""
        mask = batch["attention_mask"]
        packed = batch.get("position_ids")
        samples = int((packed == 0).sum()) if packed is not None else mask.shape[0]
        self.sums.update(
            tokens=int(mask.sum()), padded=mask.numel(), samples=samples, flops=flops, logits=logits
        )

    def values(self, engine: Engine) -> dict[str, float]:
        """Reduced per-second rates, the mean loss per target and the mean of every task statistic."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        totals = {key: engine.all_reduce_sum(float(value)) for key, value in sorted(self.sums.items())}
        targets = max(totals.get("targets", 0.0), 1.0)
        values = {"loss": round(totals.get("loss", 0.0) / targets, 6)}
        for key, value in totals.items():
            if key.startswith("stat/"):
                values[key[len("stat/") :]] = round(value / targets, 6)
        values["tokens_per_s"] = round(totals.get("tokens", 0.0) / elapsed, 1)
        values["samples_per_s"] = round(totals.get("samples", 0.0) / elapsed, 2)
        values["pad_fraction"] = round(1 - totals.get("tokens", 0.0) / max(totals.get("padded", 0.0), 1.0), 4)
        values["logit_fraction"] = round(totals.get("logits", 0.0) / max(totals.get("padded", 0.0), 1.0), 4)
        values["step_s"] = round(elapsed / max(self.steps, 1), 4)
        values["nonfinite_steps"] = int(totals.get("nonfinite_steps", 0.0) / engine.world_size)
        peak = peak_flops()
        values["mfu"] = (
            round(totals.get("flops", 0.0) / elapsed / (peak * engine.world_size), 4) if peak else None
        )
        if engine.device.type == "cuda":
            values["mem_peak_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2)
            values["mem_reserved_gib"] = round(torch.cuda.max_memory_reserved(engine.device) / 2**30, 2)
        return values
