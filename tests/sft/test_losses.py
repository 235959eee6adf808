"""Weighted cross-entropy, the distillation loss and the temperature schedule against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sft.losses import distillation_loss, kl_teacher_student, temperature_at, weighted_mean


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


STUDENT = [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
TEACHER = [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]
LABELS = [0, 2]


def test_weighted_cross_entropy_matches_hand_computation():
    # CE1 = log(e^2 + e + 1) - 2 = 0.407606; CE2 = log 3 = 1.098612 (a uniform distribution).
    ce1 = math.log(math.exp(2) + math.e + 1) - 2
    ce2 = math.log(3)
    assert ce1 == pytest.approx(0.407606, abs=1e-6) and ce2 == pytest.approx(1.098612, abs=1e-6)
    weights = [0.75, 0.25]
    expected = (0.75 * ce1 + 0.25 * ce2) / 1.0  # = 0.580358
    loss, ce, kd = distillation_loss(torch.tensor(STUDENT), None, torch.tensor(LABELS), torch.tensor(weights))
    assert loss.item() == pytest.approx(expected, abs=1e-6) == pytest.approx(0.580358, abs=1e-6)
    assert ce.item() == loss.item() and kd is None


def test_per_sample_mean_then_weighted_mean_over_samples():
    # Sample A (weight 2) has two loss tokens with losses 1 and 3; sample B (weight 1) one token with loss 6.
    # Per-sample means: A = 2, B = 6; weighted mean = (2 * 2 + 1 * 6) / 3 = 10/3. Token weights are w / n.
    per_token = torch.tensor([1.0, 3.0, 6.0])
    token_weights = torch.tensor([2 / 2, 2 / 2, 1 / 1])
    assert weighted_mean(per_token, token_weights).item() == pytest.approx(10 / 3)
    # A plain token mean would give 10/3 too only by accident; with B weighted 0 it must be A's mean alone.
    assert weighted_mean(per_token, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)


def test_micro_batches_divided_by_the_steps_total_weight_add_up_to_the_whole_steps_mean():
    # The step of the test above split into two micro-batches, [A] and [B]: each divided by its own weight, the weights
    # cancel (2 + 6 = 8, whatever they are); divided by the step's total weight 3, the shares add up to 10/3.
    a, b = (torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])), (torch.tensor([6.0]), torch.tensor([1.0]))
    assert weighted_mean(*a).item() + weighted_mean(*b).item() == pytest.approx(8.0)
    shares = weighted_mean(*a, total_weight=3.0), weighted_mean(*b, total_weight=3.0)
    assert (shares[0] + shares[1]).item() == pytest.approx(10 / 3)
    # distillation_loss divides both of its terms by the same total.
    s, te, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    whole = distillation_loss(s, te, y, torch.tensor([0.75, 0.25]), alpha=0.7, temperature=2.0)
    halves = [
        distillation_loss(s[i : i + 1], te[i : i + 1], y[i : i + 1], w, alpha=0.7, temperature=2.0, total_weight=1.0)
        for i, w in ((0, torch.tensor([0.75])), (1, torch.tensor([0.25])))
    ]
    for k in range(3):
        assert sum(h[k].item() for h in halves) == pytest.approx(whole[k].item(), abs=1e-6)


def test_kd_loss_matches_hand_computation():
    t, alpha = 2.0, 0.7
    p_teacher = _softmax(TEACHER[0], t)  # softmax([0, .5, 1])
    p_student = _softmax(STUDENT[0], t)  # softmax([1, .5, 0])
    kl1 = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_teacher, p_student, strict=True))
    kl2 = 0.0  # both uniform
    # p_t = (.1863, .3072, .5065), p_s mirrored: the log ratios are -1, 0, +1, so KL = .5065 - .1863 = .3202
    assert kl1 == pytest.approx(0.3202, abs=1e-4)
    weights = [1.0, 1.0]
    ce = (math.log(math.exp(2) + math.e + 1) - 2 + math.log(3)) / 2
    kd = (kl1 + kl2) / 2
    expected = alpha * t**2 * kd + (1 - alpha) * ce
    loss, ce_t, kd_t = distillation_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(LABELS),
        torch.tensor(weights),
        alpha=alpha,
        temperature=t,
    )
    assert kd_t.item() == pytest.approx(kd, abs=1e-6)
    assert ce_t.item() == pytest.approx(ce, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_is_zero_for_identical_distributions_and_asymmetric_otherwise():
    logits = torch.tensor(STUDENT)
    assert kl_teacher_student(logits, logits, 3.0).abs().max().item() < 1e-6
    a, b = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert kl_teacher_student(a, b, 1.0).item() != pytest.approx(kl_teacher_student(b, a, 1.0).item(), abs=1e-3)


def test_alpha_zero_is_plain_cross_entropy_and_alpha_one_is_pure_kd():
    s, te, y, w = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), torch.ones(2)
    ce_only, _, _ = distillation_loss(s, None, y, w)
    assert distillation_loss(s, te, y, w, alpha=0.0, temperature=4.0)[0].item() == pytest.approx(ce_only.item())
    loss, _, kd = distillation_loss(s, te, y, w, alpha=1.0, temperature=4.0)
    assert loss.item() == pytest.approx(16 * kd.item())


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("linear", 0.0, 5.0),
        ("linear", 0.25, 4.0),
        ("linear", 0.5, 3.0),
        ("linear", 1.0, 1.0),
        ("cosine", 0.0, 5.0),
        ("cosine", 0.25, 1 + 4 * (1 + math.cos(math.pi / 4)) / 2),  # 4.414
        ("cosine", 0.5, 3.0),
        ("cosine", 1.0, 1.0),
        ("constant", 0.7, 5.0),
        ("linear", 1.5, 1.0),  # clamped past the end
    ],
)
def test_temperature_schedule_follows_its_curve(schedule, progress, expected):
    assert temperature_at(progress, 5.0, 1.0, schedule) == pytest.approx(expected)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown temperature schedule"):
        temperature_at(0.5, 5.0, 1.0, "step")
