"""Step time of the demo recipe with each attention kernel, measured in the same run.

Trains the demo recipe (tiny VLM, synthetic shapes) for ``--steps`` steps once per kernel, each in
its own process, on whatever device the trainer picks: CUDA in bf16 autocast when there is one,
else CPU in fp32. Reports the median seconds per step over the logging windows after the first
(which holds start-up and warm-up), tokens/s, peak memory on CUDA, and each kernel's ratio to the
baseline (the first kernel listed, eager by default). No checkpoint is written. Run:

    .venv/bin/python bench/demo_attention.py [--steps 300] [--kernels eager sdpa] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_kernel(kernel: str, steps: int, log_every: int, extra: list[str]) -> dict:
    """Train the demo with ``kernel`` and summarise its metrics after the first logging window."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "recipe=demo",
            f"model.attn_implementation={kernel}",
            f"train.max_steps={steps}",
            f"train.log_every={log_every}",
            f"train.save_every={steps + 1}",
            "train.save_last=false",
            f"output_dir={tmp}/run",
            *extra,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"training with {kernel} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    summary = {
        "kernel": kernel,
        "step_s": statistics.median(r["step_s"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "final_loss": rows[-1]["loss"],
    }
    for key in ("mem_peak_gib", "mfu"):
        if rows[-1].get(key) is not None:
            summary[key] = rows[-1][key]
    return summary


def main() -> None:
    """Time each kernel and print one JSON line per kernel, then a table with ratios to the first."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per kernel")
    parser.add_argument("--log-every", type=int, default=50, help="steps per timing window")
    parser.add_argument("--kernels", nargs="+", default=["eager", "sdpa"], help="first one is the baseline")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. train.cpu_threads=1")
    args = parser.parse_args()
    results = [run_kernel(k, args.steps, args.log_every, args.overrides) for k in args.kernels]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (fp32)"
    base = results[0]["step_s"]
    print(f"demo recipe, {args.steps} steps per kernel, on {device}")
    print(
        "| kernel | s/step (median) | tokens/s | peak GiB | final loss | speed vs "
        + results[0]["kernel"]
        + " |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        r["speedup_vs_baseline"] = round(base / r["step_s"], 3)
        print(
            f"| {r['kernel']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {r.get('mem_peak_gib', '-')} | "
            f"{r['final_loss']:.4f} | {r['speedup_vs_baseline']:.2f}x |"
        )
    print(json.dumps({"device": device, "results": results}))
    if args.out:
        args.out.write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
