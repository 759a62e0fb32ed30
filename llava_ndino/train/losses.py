"""Loss components shared by the tasks: the positions that carry labels, next-token cross-entropy
(chunked above a size so a 128k vocabulary's fp32 copies never exist at once), sequence
log-probabilities and the sigmoid DPO loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_ndino.data.encode import IGNORE_INDEX


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a label in any row of ``labels`` (sorted, 1-D).

    Passed as ``logits_to_keep``, they make the model compute logits only where the loss needs them.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


LOSS_CHUNK = 1024
"""Label positions per cross-entropy chunk when the loss is chunked (see :func:`token_loss_sum`)."""


LOSS_CHUNK_ABOVE = 4096
"""Chunk the loss only above this many label positions in a micro-batch: below it the fp32 copies are small."""


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (dtype kept) and the labels they predict: each position's next token, over every
    position or only ``positions`` (the logits were then computed there alone, with ``logits_to_keep``)."""
    if positions is None:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels[:, positions + 1]


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy computed ``chunk`` rows at a time, its gradient written during the forward.

    Each chunk is upcast to fp32, its loss summed and its gradient (softmax minus one-hot, zero on
    ignored rows) stored in the logits' dtype; the backward only scales that gradient. The fp32
    temporaries exist for one chunk at a time, and the logits need not be kept for the backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_probs = logits[rows].float().log_softmax(dim=-1)
            valid = (targets[rows] != IGNORE_INDEX).unsqueeze(1)
            index = targets[rows].clamp(min=0).unsqueeze(1)  # ignored rows point at 0, then are masked
            total -= (log_probs.gather(1, index) * valid).sum()
            probs = log_probs.exp_()
            probs.scatter_add_(1, index, -valid.to(probs.dtype))
            grad[rows] = probs.mul_(valid)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """Scale the stored gradient in place (the graph is never run backward twice)."""
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``logits`` against ``labels`` (``-100`` ignored), in fp32.

    ``logits`` cover every position, or only ``positions`` (from :func:`label_positions`) when given.
    Above :data:`LOSS_CHUNK_ABOVE` positions the loss runs through :class:`ChunkedCrossEntropy` in
    chunks of :data:`LOSS_CHUNK`: instead of fp32 log-probabilities and two fp32 gradients for every
    position (12 bytes per logit, gigabytes at a 128k vocabulary), one gradient in the logits' dtype.
    """
    shifted, targets = shift_for_next_token(logits, labels, positions)
    flat, flat_targets = shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1)
    if flat.shape[0] <= LOSS_CHUNK_ABOVE or not flat.requires_grad:
        return _cross_entropy_sum(flat, flat_targets)
    return ChunkedCrossEntropy.apply(flat, flat_targets, LOSS_CHUNK)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that carry loss after the next-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (next-token shift, ``-100`` ignored), in fp32.

    ``logits`` cover every position, or only ``positions`` (from :func:`label_positions`) when given.
    """
    shifted, targets = shift_for_next_token(logits, labels, positions)
    per_token = F.cross_entropy(
        shifted.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -per_token.sum(dim=-1)


def dpo_loss_sum(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed sigmoid DPO loss of rows ``[chosen..., rejected...]`` and summed reward statistics."""
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    stats = {
        "reward_chosen": float(chosen_reward.detach().sum()),
        "reward_rejected": float(rejected_reward.detach().sum()),
        "reward_margin": float(margin.detach().sum()),
        "reward_accuracy": float((margin.detach() > 0).float().sum()),
    }
    return -F.logsigmoid(margin).sum(), stats
