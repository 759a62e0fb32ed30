"""Peak memory and time of the loss over large logits: one pass (baseline) against the chunked loss.

Above ``LOSS_CHUNK_ABOVE`` label positions, ``token_loss_sum`` computes the cross-entropy in chunks
of ``LOSS_CHUNK`` positions and writes each chunk's gradient during the forward
(``ChunkedCrossEntropy``), so the fp32 upcast and log-probabilities exist for one chunk at a time
and the gradient is held once, in the logits' dtype. This script runs forward and
backward of the loss alone on random logits (a leaf tensor standing for the LM head's output) of
``--positions`` x ``--vocab``, in fp32 (the CPU trainer) and in bf16 (what autocast gives on a GPU),
both ways in the same run, and prints peak live tensor bytes (tracked op by op, as in
``bench/memory_plan.py``), the median time, and the ratios. Run:

    OMP_NUM_THREADS=2 .venv/bin/python bench/chunked_loss.py [--positions 8192 --vocab 32768]
"""

from __future__ import annotations

import argparse

import torch

from llava_ndino.train import tasks

MiB = 2**20


def _peak_and_time(
    logits: torch.Tensor, targets: torch.Tensor, chunked: bool, repeats: int
) -> tuple[int, float]:
    """Peak bytes allocated during forward+backward of the loss, and its median wall time."""
    from label_logits import _median_seconds
    from memory_plan import _make_tracker

    tasks.LOSS_CHUNK_ABOVE = 4096 if chunked else 10**12
    labels = torch.cat([torch.full((1,), -100), targets])[None]

    def step() -> None:
        logits.grad = None
        tasks.token_loss_sum(logits[None], labels).backward()

    with _make_tracker()() as tracker:
        step()
    return tracker.peak, _median_seconds(step, repeats)


def main() -> None:
    """Measure both ways in fp32 and bf16 and print a table with ratios to the one-pass loss."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, default=8192, help="label positions (rows x kept positions)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"loss over {args.positions} positions x {args.vocab} vocabulary, chunks of {tasks.LOSS_CHUNK}")
    print("| logits | one pass: peak MiB / s | chunked: peak MiB / s | peak ratio | time ratio |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        # logits[:, :-1] predicts labels[:, 1:]: one extra position so every kept logit has a target
        logits = torch.randn(args.positions + 1, args.vocab, dtype=dtype).requires_grad_()
        targets = torch.randint(0, args.vocab, (args.positions,))
        base_peak, base_s = _peak_and_time(logits, targets, chunked=False, repeats=args.repeats)
        peak, seconds = _peak_and_time(logits, targets, chunked=True, repeats=args.repeats)
        print(
            f"| {str(dtype).removeprefix('torch.')} ({logits.numel() * logits.element_size() / MiB:.0f} MiB) | "
            f"{base_peak / MiB:.0f} / {base_s:.2f} | {peak / MiB:.0f} / {seconds:.2f} | "
            f"{peak / base_peak:.2f} | {seconds / base_s:.2f} |"
        )


if __name__ == "__main__":
    main()
