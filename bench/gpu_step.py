"""Training-step throughput and memory of llava-ndino on a real-shape VLM, beside plain transformers.

Writes random-weight model folders in the real formats: a CLIP ViT-L/14-336 tower (24 layers,
1024 wide) and a LLaMA-3-shaped LM (default about 1.2B: 16 layers, 2048 wide, 32 heads, 8 KV
heads, 8192 MLP, vocabulary 128256, bf16 on disk). Then it trains them with ``launch/train.py``
as a user would: ``model.source=components``, synthetic shapes dialogues on 672x672 images (anyres
base + 2x2 tiles = 2928 image tokens), the projector, image newline and LM trainable, the tower
frozen, bf16, gradient checkpointing, ``engine=zero2`` (by default) on one GPU. No checkpoint is
written.

It reports the median seconds per step over the logging windows after the first, real tokens/s,
MFU (the trainer's count) and peak memory, and compares the peak with ``ndino plan``'s estimate
for the same micro-batch. With ``--anchor PATH`` it also runs an external baseline script (not part
of this repository): a plain-transformers LlavaNext training step that takes the same batch and
padded length and prints one JSON line; our tokens/s are then printed as a ratio to the anchor's,
measured in the same call. Run on a GPU machine:

    python bench/gpu_step.py [--anchor PATH/TO/anchor.py] [--out FILE.json]

``--tiny`` shrinks every shape for a CPU smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
ANCHOR_IMAGE_TOKENS = 2928
"""The anchor's one 672x672 image: 576 base + 48x48 grid + 48 newlines, as ours at 336 px tiles."""


def write_components(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Write the random CLIP tower and LLaMA-3-shaped LM folders (with the tiny tokenizer) under ``out``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava_ndino.model.hf_files import mark_tokenizer_portable
    from llava_ndino.model.tiny import llama3_lm, tiny_image_processor
    from llava_ndino.model.tokenizer import train_tiny_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 as LLaMA-3 ships; fp32 for CPU
    wide = not args.tiny
    vision_config = CLIPVisionConfig(
        hidden_size=1024 if wide else 64,
        intermediate_size=4096 if wide else 256,
        num_hidden_layers=24 if wide else 2,
        num_attention_heads=16 if wide else 2,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(0)
    vision_dir, llm_dir = out / "vision", out / "llm"
    with torch.device(device):
        vision = CLIPVisionModel(vision_config)
    vision.to(dtype).save_pretrained(vision_dir)
    tiny_image_processor(336).save_pretrained(vision_dir)
    del vision
    heads = args.hidden // 64
    with torch.device(device):
        llm = llama3_lm(
            tokenizer, args.hidden, 4 * args.hidden, args.layers, heads, min(8, heads), args.vocab
        )
    llm.to(dtype).save_pretrained(llm_dir)
    del llm
    tokenizer.save_pretrained(llm_dir)
    mark_tokenizer_portable(llm_dir)
    if device == "cuda":
        torch.cuda.empty_cache()
    return vision_dir, llm_dir


def overrides(vision: Path, llm: Path, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The recipe overrides of the measured run."""
    return [
        "recipe=demo",
        "model.source=components",
        f"model.vision={vision}",
        f"model.llm={llm}",
        f"model.attn_implementation={args.attn}",
        "data.synthetic.image_size=672",
        f"data.synthetic.train={args.batch * (args.steps + 2) * 4}",
        "data.max_length=4096",
        f"data.num_workers={args.workers}",
        f"engine={args.engine}",
        f"train.per_device_batch_size={args.batch}",
        "train.lr=1e-5",
        "train.warmup_ratio=0",
        "train.trainable=[projector,newline,llm]",
        f"train.gradient_checkpointing={str(not args.no_grad_ckpt).lower()}",
        f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.save_every={args.steps + 1}",
        "train.save_last=false",
        f"output_dir={run_dir}",
    ]


def train_and_measure(tokens: list[str], run_dir: Path) -> dict:
    """Run the trainer on ``tokens`` in a child process and summarise its metrics after the first window."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), *tokens], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"training failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    median = {k: statistics.median(r[k] for r in steady) for k in ("step_s", "tokens_per_s", "samples_per_s")}
    last = rows[-1]
    padded = median["tokens_per_s"] / max(1 - statistics.median(r["pad_fraction"] for r in steady), 1e-9)
    return {
        **median,
        "mfu": statistics.median(r["mfu"] for r in steady) if last.get("mfu") is not None else None,
        "mem_peak_gib": last.get("mem_peak_gib"),
        "mem_reserved_gib": last.get("mem_reserved_gib"),
        "row_tokens": round(padded / median["samples_per_s"]),
        "pad_fraction": statistics.median(r["pad_fraction"] for r in steady),
        "logit_fraction": statistics.median(r["logit_fraction"] for r in steady),
        "final_loss": last["loss"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def planned(tokens: list[str], engine: str, batch: int, row_tokens: int, logit_fraction: float = 1.0) -> dict:
    """``ndino plan``'s per-GPU estimate (GiB) for one micro-batch of ``batch`` rows of ``row_tokens``,
    with the logits at ``logit_fraction`` of the positions (1: the planner's default upper bound)."""
    from llava_ndino.config import load_config
    from llava_ndino.plan.dimensions import model_shape
    from llava_ndino.plan.planner import (
        CONTEXT_BYTES,
        Precision,
        Workload,
        estimate,
        weight_bytes,
        zero_settings,
    )

    cfg = load_config(tokens)
    shape = model_shape(cfg)
    attn = cfg.model.attn_implementation
    work = Workload(rows=batch, row_tokens=row_tokens, images=batch, attn=attn, logit_fraction=logit_fraction)
    row = estimate(
        shape,
        set(cfg.train.trainable),
        work,
        Precision.for_gpu(weight_bytes(cfg)),
        engine,
        cfg.train.gradient_checkpointing,
        gpus=1,
        zero=zero_settings(engine, cfg),
    )
    return {
        "total_gib": round(row.total / GIB, 2),
        "without_cuda_allowance_gib": round((row.total - CONTEXT_BYTES) / GIB, 2),
        "params_gib": round(row.params / GIB, 2),
        "grads_gib": round(row.grads / GIB, 2),
        "optimizer_gib": round(row.optimizer / GIB, 2),
        "activations_gib": round(row.activations / GIB, 2),
        "buffers_gib": round(row.buffers / GIB, 2),
    }


def run_anchor(path: Path, args: argparse.Namespace, text_tokens: int) -> dict:
    """Run the plain-transformers anchor at our batch and padded length; return its JSON line."""
    command = [sys.executable, str(path), "--batch", str(args.batch), "--steps", "10"]
    command += ["--text", str(text_tokens), "--layers", str(args.layers), "--hidden", str(args.hidden)]
    command += [] if args.no_grad_ckpt else ["--grad-ckpt"]
    command += ["--tiny"] if args.tiny else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"anchor failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write the models, train, plan, run the anchor, and print a table and one JSON line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", default="zero2", help="engine of the measured run")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=5, help="steps per timing window")
    parser.add_argument("--layers", type=int, default=16, help="LM depth")
    parser.add_argument("--hidden", type=int, default=2048, help="LM width")
    parser.add_argument("--vocab", type=int, default=128256, help="LM vocabulary rows")
    parser.add_argument("--attn", default="sdpa", help="attention kernel")
    parser.add_argument("--workers", type=int, default=6, help="data loader workers")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="train without gradient checkpointing")
    parser.add_argument(
        "--anchor",
        type=Path,
        help="an external plain-transformers LlavaNext step script, run at the same shapes",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of this script")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.vocab = 2, 128, 2048
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        vision, llm = write_components(Path(tmp), args)
        run_dir = Path(tmp) / "run"
        tokens = overrides(vision, llm, run_dir, args)
        ours = train_and_measure(tokens, run_dir)
        plan = planned(tokens, args.engine, args.batch, ours["row_tokens"])
        kept = planned(tokens, args.engine, args.batch, ours["row_tokens"], ours["logit_fraction"])
    result = {"device": device, "torch": torch.__version__, "engine": args.engine, "batch": args.batch}
    result |= {"ours": ours, "plan": plan, "plan_at_logit_fraction": kept}
    if args.anchor:
        text = max(ours["row_tokens"] - ANCHOR_IMAGE_TOKENS - 1, 1)
        result["anchor"] = anchor = run_anchor(args.anchor, args, text)
        result["tokens_per_s_vs_anchor"] = round(ours["tokens_per_s"] / anchor["real_tokens_per_s"], 3)
    print(
        f"{device}: {args.engine}, LM {args.layers}x{args.hidden}, batch {args.batch} x {ours['row_tokens']} tokens"
    )
    print("| run | s/step | real tokens/s | MFU | peak allocated GiB | reserved GiB |")
    print("|---|---|---|---|---|---|")
    print(
        f"| llava-ndino {args.engine} | {ours['step_s']:.3f} | {ours['tokens_per_s']:.0f} | {ours['mfu']} | "
        f"{ours['mem_peak_gib']} | {ours['mem_reserved_gib']} |"
    )
    if args.anchor:
        print(
            f"| plain transformers (anchor, AdamW, no ZeRO) | {anchor['step_s_median']:.3f} | "
            f"{anchor['real_tokens_per_s']:.0f} | {anchor['mfu']} | {anchor['peak_mem_gb']} | - |"
        )
        print(f"tokens/s ours / anchor: {result['tokens_per_s_vs_anchor']:.2f}x")
    for name, row in (
        ("upper bound, logits everywhere", plan),
        (f"logit_fraction={ours['logit_fraction']}", kept),
    ):
        print(
            f"ndino plan for this micro-batch ({name}): {row['total_gib']} GiB with its 2.5 GiB CUDA "
            f"allowance, {row['without_cuda_allowance_gib']} GiB without it"
        )
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
