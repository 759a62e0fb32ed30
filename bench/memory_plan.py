"""Check `ndino plan`'s memory estimate against real training steps on CPU.

Each configuration runs in a fresh subprocess: it builds a small LlavaNext model (the demo's tiny
VLM made bigger: LLM 512 wide x 4 layers, vocabulary 16,384, CLIP tower 256 wide x 4 layers at
336 px), feeds it one worst-case micro-batch (one 672x672 image = 5 anyres tiles, rows padded to
the sequence length) and runs forward, backward and an AdamW step. Two measurements:

* tensors: the peak of live tensor bytes, tracked op by op with a ``TorchDispatchMode`` (the CPU
  analogue of ``torch.cuda.max_memory_allocated``): parameters and optimizer state held before the
  step, plus the peak of tensors allocated during it;
* RSS: the process's peak resident set (``ru_maxrss``) above its RSS before the model was built,
  which adds allocator overhead and Python objects.

The estimate is the planner's, for one process (no engine buffers, no CUDA allowance) at CPU
precision (fp32 weights and activations, 8-byte AdamW state). Run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_plan.py [--out docs/memory_plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

MODEL = [
    "recipe=demo",
    "model.tiny.tile_size=336",
    "model.tiny.hidden_size=512",
    "model.tiny.layers=4",
    "model.tiny.vision_hidden_size=256",
    "model.tiny.vision_layers=4",
]
VOCAB = 16384
CONFIGS = {
    "all parts": (["vision", "projector", "llm", "newline"], False),
    "all parts, checkpointing": (["vision", "projector", "llm", "newline"], True),
    "projector only (align)": (["projector", "newline"], False),
    "projector only, checkpointing": (["projector", "newline"], True),
}
"""name -> (train.trainable, gradient checkpointing)."""
MiB = 2**20


def _make_tracker():
    """Return a TorchDispatchMode that tracks the peak bytes of CPU tensor storages created under it."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakTracker(TorchDispatchMode):
        """Counts each new storage once; storages that existed before (inputs) count as 0 bytes."""

        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.current = self.peak = 0

        def _see(self, tensors, new: bool) -> None:
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in self.live:
                        size = t.untyped_storage().nbytes() if new else 0
                        self.live[ref.cdata] = (ref, size)
                        self.current += size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._see(tree_flatten((args, kwargs))[0], new=False)
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]
            self._see(tree_flatten(out)[0], new=True)
            self.peak = max(self.peak, self.current)
            return out

    return PeakTracker


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _batch(model, processor, seq_len: int) -> dict:
    """One row of ``seq_len`` tokens: a 672x672 image (5 tiles) plus text, the last position padded."""
    import torch
    from PIL import Image

    encoded = processor(
        images=[Image.new("RGB", (672, 672), (90, 140, 200))], text=["<image> ciao"], return_tensors="pt"
    )
    ids = encoded["input_ids"][0]
    ids = torch.cat([ids, torch.full((seq_len - ids.numel(),), 100, dtype=ids.dtype)])[None]
    mask = torch.ones_like(ids)
    mask[:, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": encoded["pixel_values"],
        "image_sizes": encoded["image_sizes"],
        "labels": labels,
    }


def measure(name: str, seq_len: int, steps: int) -> dict:
    """Build the model, run ``steps`` training steps of configuration ``name``, return the measurements."""
    import torch

    from llava_ndino.config import load_config
    from llava_ndino.model.loading import build_model
    from llava_ndino.train.losses import token_loss_sum
    from llava_ndino.train.parts import apply_trainable, param_groups

    trainable, checkpointing = CONFIGS[name]
    cfg = load_config(MODEL)
    rss_before = _rss_bytes()
    model, processor = build_model(cfg.model, cfg.seed)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    apply_trainable(model, trainable)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train))
    batch = _batch(model, processor, seq_len)
    labels = batch.pop("labels")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = 0
    for _ in range(steps):
        held = params + sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        with _make_tracker()() as tracker:
            loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
        peak = max(peak, held + tracker.peak)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tensor_peak": peak, "rss_delta": rss_peak - rss_before, "config": model.config.to_dict()}


def planned(name: str, config: dict, seq_len: int) -> dict[str, float]:
    """The planner's one-process estimate for configuration ``name`` at CPU precision, by component."""
    from transformers import LlavaNextConfig

    from llava_ndino.plan.dimensions import shape_from_llava_config
    from llava_ndino.plan.planner import CPU_FP32, Workload, activation_parts, estimate

    trainable, checkpointing = CONFIGS[name]
    shape = shape_from_llava_config(LlavaNextConfig.from_dict(config), "bench")
    work = Workload(rows=1, row_tokens=seq_len, images=1)
    row = estimate(shape, set(trainable), work, CPU_FP32, "ddp", checkpointing, gpus=1)
    parts = activation_parts(shape, set(trainable), work, CPU_FP32, checkpointing)
    return {"weights+grads+optimizer": row.params + row.grads + row.optimizer, **parts}


def run_all(seq_len: int, steps: int) -> list[dict]:
    """Measure every configuration in its own subprocess and pair it with the estimate."""
    results = []
    for name in CONFIGS:
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--seq-len",
            str(seq_len),
            "--steps",
            str(steps),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        estimate = planned(name, measured.pop("config"), seq_len)
        results.append({"config": name, "estimate": estimate, **measured})
    return results


def table(results: list[dict]) -> str:
    """Markdown table: estimate (total and activation parts) against both measurements, in MiB."""
    lines = [
        "| configuration | estimate | of it: layers / log-probs / backward peak | measured tensors | ratio | measured RSS | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        est = sum(r["estimate"].values())
        parts = " / ".join(f"{r['estimate'][k] / MiB:.0f}" for k in ("layers", "log-probs", "backward peak"))
        lines.append(
            f"| {r['config']} | {est / MiB:.0f} | {parts} | {r['tensor_peak'] / MiB:.0f} | "
            f"{est / r['tensor_peak']:.2f} | {r['rss_delta'] / MiB:.0f} | {est / r['rss_delta']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; as a child measure one configuration, else run them all and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration (default 2)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.seq_len, args.steps)))
        return
    results = run_all(args.seq_len, args.steps)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
