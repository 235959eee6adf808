"""The two losses `distill sft` adds to TRL's cross-entropy, as pure functions so they can be checked by hand.

Per-token weights carry both ideas at once. A sample of weight w with n loss tokens gives each of them w / n, so
`sum(c_t * loss_t) / sum(c_t)` is exactly "a per-token mean within each sample, then the w-weighted mean over the
samples", and it stays right when samples of different lengths share a padded or padding-free batch. In training the
denominator is `sum(c_t)` over the whole optimizer step, not over one micro-batch (sft/trainer.py): otherwise the
weights would cancel within each micro-batch, and with one sample per device they would do nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weighted_mean(
    per_token: torch.Tensor, weights: torch.Tensor, total_weight: torch.Tensor | float | None = None
) -> torch.Tensor:
    """sum(weights * per_token) / total_weight, by default sum(weights): a batch's weighted mean, or with the whole
    step's total its share of the step's mean. A step without weight gives a differentiable 0, not NaN."""
    total = weights.sum() if total_weight is None else torch.as_tensor(total_weight, dtype=torch.float32)
    return (per_token * weights).sum() / total.to(per_token.device).clamp(min=1e-12)


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position KL(p_teacher,T || p_student,T) over the last (vocabulary) dimension."""
    student_log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    total_weight: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """alpha * T^2 * KL + (1 - alpha) * CE over N scored positions: logits [N, V], labels and weights [N].

    Both terms are weighted sums over the positions divided by `total_weight` (the token weight of the whole
    optimizer step in training; by default these positions' own, a weighted mean), so KD and CE weigh samples alike.
    T^2 keeps the gradient of the soft term on the scale of the hard one as T changes (Hinton et al., 2015).
    Returns (loss, ce, kd); kd is None without a teacher.
    """
    ce = weighted_mean(F.cross_entropy(student_logits.float(), labels, reduction="none"), token_weights, total_weight)
    if teacher_logits is None or alpha == 0:
        return ce, ce, None
    kd = weighted_mean(kl_teacher_student(student_logits, teacher_logits, temperature), token_weights, total_weight)
    return alpha * temperature**2 * kd + (1 - alpha) * ce, ce, kd


def temperature_at(progress: float, start: float, end: float, schedule: str = "linear") -> float:
    """Distillation temperature after `progress` (0..1) of training: soft targets early, sharp ones late."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    raise ValueError(f"unknown temperature schedule {schedule!r}")
