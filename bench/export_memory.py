"""Host memory of checkpoint export: does `ndino export` hold the model once or twice?

Trains a ~0.1B-parameter tiny VLM for one step (so a real checkpoint exists), then runs
`ndino export` in fresh subprocesses, fp32 as stored and converted to bf16, and prints each one's
peak RSS next to the model's size. A process that held two full copies would peak at about
(baseline + 2 x model); the ratio column is (peak - baseline) / model.

    .venv/bin/python bench/export_memory.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PEAK_PROBE = """
import resource, runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_module("llava_ndino.cli", run_name="__main__")
except SystemExit:
    pass
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE_PROBE = """
import resource
import llava_ndino.export.vlm, llava_ndino.model.loading, transformers
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter and return its peak RSS in MiB."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024


def main() -> None:
    """Train one step, export twice, print the memory table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024, help="tiny LLM hidden size")
    parser.add_argument("--layers", type=int, default=8, help="tiny LLM layers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llava_ndino.cli",
                "train",
                "recipe=demo",
                f"output_dir={run}",
                f"model.tiny.hidden_size={args.hidden}",
                f"model.tiny.layers={args.layers}",
                "train.max_steps=1",
                "train.per_device_batch_size=1",
                "data.synthetic.train=4",
            ],
            check=True,
            capture_output=True,
        )
        model_mb = (run / "checkpoints" / "step_1" / "model.safetensors").stat().st_size / 2**20
        baseline = _peak_mb(BASELINE_PROBE)
        print(f"model.safetensors: {model_mb:.0f} MiB (fp32); interpreter + imports: {baseline:.0f} MiB")
        print(f"{'export':<16} {'peak RSS MiB':>12} {'(peak-base)/model':>18}")
        for dtype in ("auto", "bfloat16"):
            argv = ["ndino", "export", str(run), "--out", str(Path(tmp) / f"out_{dtype}"), "--dtype", dtype]
            peak = _peak_mb(PEAK_PROBE.format(argv=argv))
            print(f"{dtype:<16} {peak:>12.0f} {(peak - baseline) / model_mb:>18.2f}")


if __name__ == "__main__":
    main()
