"""Weighted cross-entropy, the distillation loss and the temperature schedule against values computed by hand, and the
memory-bounded (chunked, fused linear) path against the full-logits one: losses and gradients within 1e-4 relative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sft.losses import (
    DenseTeacher,
    SparseTeacher,
    chunked_distillation_loss,
    default_chunk_size,
    distillation_loss,
    kl_teacher_student,
    linear_cross_entropy,
    sparse_kl_teacher_student,
    temperature_at,
    weighted_mean,
)


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


# --- The chunked path against full logits ----------------------------------------------------------------------------

N, H, V, HT = 37, 16, 50, 12  # chunk 8 does not divide 37: the last chunk has 5 positions


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(kind: str, vt: int = V + 3, dtype=torch.float32, seed: int = 0):
    """Student hidden/weight (leaves), labels, uneven weights and a teacher of the given kind; Vt > V by default."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    labels = torch.randint(0, min(V, vt), (N,), generator=g)
    weights = torch.rand(N, generator=g) * 2  # uneven; a few positions near 0
    teacher = None
    if kind == "dense":
        teacher = DenseTeacher(
            torch.randn(N, HT, generator=g).to(dtype), (torch.randn(vt, HT, generator=g) / 2).to(dtype)
        )
    elif kind == "sparse":
        k = 6
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
        logprobs = (torch.randn(N, k, generator=g) * 2).log_softmax(-1) - 0.3  # top-k mass 0.74, as stored
        ids[0, 4:] = -1  # padding by id
        logprobs[1, 3:] = -torch.inf  # padding by log-prob
        teacher = SparseTeacher(ids, logprobs)
    return hidden, weight, labels, weights, teacher


def _reference(hidden, weight, labels, weights, teacher, alpha, t, total):
    """The full-logits loss on hidden @ weight.T, the way sft/trainer.py calls it (both logits cut to min(V, Vt))."""
    logits = hidden @ weight.T
    if isinstance(teacher, SparseTeacher):
        ce = weighted_mean(F.cross_entropy(logits.float(), labels, reduction="none"), weights, total)
        kd = weighted_mean(sparse_kl_teacher_student(logits, teacher.token_ids, teacher.logprobs, t), weights, total)
        return alpha * t**2 * kd + (1 - alpha) * ce, ce, kd
    teacher_logits = None
    if teacher is not None:
        teacher_logits = teacher.hidden @ teacher.weight.T
        vocab = min(logits.shape[-1], teacher_logits.shape[-1])
        logits, teacher_logits = logits[:, :vocab], teacher_logits[:, :vocab]
    return distillation_loss(logits, teacher_logits, labels, weights, alpha, t, total)


@pytest.mark.parametrize("kind", ["ce", "dense", "sparse"])
@pytest.mark.parametrize("total", [None, 31.5])
def test_chunked_loss_and_gradients_match_full_logits(kind, total):
    hidden, weight, labels, weights, teacher = _case(kind)
    alpha, t = 0.6, 2.0
    ours = chunked_distillation_loss(hidden, weight, labels, weights, alpha, t, total, teacher, chunk_size=8)
    ours_grads = torch.autograd.grad(ours[0], (hidden, weight))
    ref = _reference(hidden, weight, labels, weights, teacher, alpha, t, total)
    ref_grads = torch.autograd.grad(ref[0], (hidden, weight))
    for a, b in zip(ours, ref, strict=True):
        assert (a is None) == (b is None) == (kind == "ce" and a is b)  # kd None without a teacher
        if a is not None:
            assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item()) and a.dtype == torch.float32
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and _rel(a, b) < 1e-4
    assert ours_grads[1].abs().sum() > 0 and ours[0].item() > 0.1  # nothing trivially zero


def test_each_term_alone_has_the_gradient_of_the_full_logits_term():
    # ce and kd are differentiable on their own, as in distillation_loss: backward through each, not just the sum.
    hidden, weight, labels, weights, teacher = _case("dense")
    ours = chunked_distillation_loss(hidden, weight, labels, weights, 0.3, 1.5, None, teacher, chunk_size=5)
    ref = _reference(hidden, weight, labels, weights, teacher, 0.3, 1.5, None)
    for i in (1, 2):
        a = torch.autograd.grad(ours[i], (hidden, weight), retain_graph=True)
        b = torch.autograd.grad(ref[i], (hidden, weight), retain_graph=True)
        assert _rel(a[0], b[0]) < 1e-4 and _rel(a[1], b[1]) < 1e-4


def test_dense_teacher_with_a_smaller_vocabulary_cuts_the_students_rows_too():
    # Vt < V: both compared over the first Vt rows (padded embedding rows), the trainer's rule; the student's rows
    # beyond get no gradient at all.
    hidden, weight, labels, weights, teacher = _case("dense", vt=V - 7)
    ours = chunked_distillation_loss(hidden, weight, labels, weights, 0.5, 1.0, None, teacher, chunk_size=16)
    ref = _reference(hidden, weight, labels, weights, teacher, 0.5, 1.0, None)
    gw = torch.autograd.grad(ours[0], weight)[0]
    assert gw[V - 7 :].abs().max().item() == 0.0 and gw[: V - 7].abs().max().item() > 0
    assert _rel(gw, torch.autograd.grad(ref[0], weight)[0]) < 1e-4
    for a, b in zip(ours, ref, strict=True):
        assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item())


def test_linear_cross_entropy_takes_a_gradient_per_position():
    # Per-position upstream gradients (token weights applied after the call) must be folded in before the weight
    # gradient sums over positions: a random one catches a kernel that scales by one scalar (Liger-Kernel#968).
    hidden, weight, labels, _, _ = _case("ce")
    labels = labels.clone()
    labels[3] = -100  # ignored: scores 0, as in F.cross_entropy
    upstream = torch.randn(N)
    ours = linear_cross_entropy(hidden, weight, labels, chunk_size=6)
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="none")
    assert ours.shape == (N,) and ours[3].item() == 0.0 and _rel(ours, ref) < 1e-6
    for a, b in zip(
        torch.autograd.grad((ours * upstream).sum(), (hidden, weight)),
        torch.autograd.grad((ref * upstream).sum(), (hidden, weight)),
        strict=True,
    ):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["ce", "dense", "sparse"])
def test_bf16_inputs_give_bf16_gradients_close_to_float32(kind):
    # bf16 hidden states and weights: logits computed in bf16 per chunk then float32, like a bf16 lm_head followed by
    # .float(). Compared with the float32 full-logits loss on the same (bf16-rounded) values, the gap is bf16's
    # rounding of the logits and of the gradient products (8-bit mantissa): measured 2e-4 on the loss and 3e-3 to 4e-3
    # on the gradients, as close as the full-logits loss run in bf16 itself gets; asserted at 2e-3 and 1e-2.
    hidden, weight, labels, weights, teacher = _case(kind, dtype=torch.bfloat16)
    ours = chunked_distillation_loss(hidden, weight, labels, weights, 0.6, 2.0, None, teacher, chunk_size=8)
    grads = torch.autograd.grad(ours[0], (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    if isinstance(teacher, DenseTeacher):
        teacher = DenseTeacher(teacher.hidden.float(), teacher.weight.float())
    ref = _reference(h32, w32, labels, weights, teacher, 0.6, 2.0, None)
    ref_grads = torch.autograd.grad(ref[0], (h32, w32))
    assert abs(ours[0].item() - ref[0].item()) <= 2e-3 * abs(ref[0].item())
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 1e-2


def test_sparse_kd_matches_hand_computation():
    # V = 4, K = 2, T = 2; the weight is the identity, so the hidden states are the student's logits.
    # Position 1: student [1, 0, 0, -1], label 0; the teacher stored ids (0, 2) with T=1 probabilities 0.6 and 0.2.
    #   p = softmax(log(.6)/2, log(.2)/2) = (sqrt 3, 1) / (1 + sqrt 3) = (.633975, .366025)  (renormalized, tempered)
    #   q_T = softmax([.5, 0, 0, -.5]): q0 = e^.5 / (e^.5 + 2 + e^-.5) = .387456, q2 = 1 / 4.255252 = .235004
    #   KL = .633975 ln(.633975/.387456) + .366025 ln(.366025/.235004) = .474360
    #   CE = ln(e + 2 + 1/e) - 1 = .626523
    # Position 2: student uniform [0, 0, 0, 0], label 1; stored (3, padding): p = (1, 0), KL = -ln(1/4) = ln 4 = CE.
    p0 = math.sqrt(3) / (1 + math.sqrt(3))
    e = [math.exp(x / 2) for x in (1, 0, 0, -1)]
    q0, q2 = e[0] / sum(e), e[2] / sum(e)
    kl1 = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / q2)
    ce1 = math.log(math.e + 2 + 1 / math.e) - 1
    assert kl1 == pytest.approx(0.474360, abs=1e-6) and ce1 == pytest.approx(0.626523, abs=1e-6)
    kd = 0.75 * kl1 + 0.25 * math.log(4)  # weights .75 / .25, total 1
    ce = 0.75 * ce1 + 0.25 * math.log(4)
    expected = 0.5 * 2.0**2 * kd + 0.5 * ce  # alpha .5, T 2
    assert expected == pytest.approx(1.812921, abs=1e-6)
    hidden = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    teacher = SparseTeacher(
        torch.tensor([[0, 2], [3, -1]]), torch.tensor([[math.log(0.6), math.log(0.2)], [0.0, 0.0]])
    )
    args = (hidden, torch.eye(4), torch.tensor([0, 1]), torch.tensor([0.75, 0.25]), 0.5, 2.0)
    loss, ce_t, kd_t = chunked_distillation_loss(*args, teacher=teacher, chunk_size=1)
    assert kd_t.item() == pytest.approx(kd, abs=1e-6)
    assert ce_t.item() == pytest.approx(ce, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    kl = sparse_kl_teacher_student(hidden, teacher.token_ids, teacher.logprobs, 2.0)
    assert kl.tolist() == pytest.approx([kl1, math.log(4)], abs=1e-6)


def test_sparse_padding_is_excluded_and_a_row_without_entries_scores_zero():
    hidden, weight, labels, weights, teacher = _case("sparse")
    ids, logprobs = teacher.token_ids.clone(), teacher.logprobs.clone()
    # Row 2 with its last two entries padded (by id, then by -inf) equals row 2 with only its first four.
    ids[2, 4], logprobs[2, 5] = -1, -torch.inf
    kl = sparse_kl_teacher_student(hidden @ weight.T, ids, logprobs, 1.0)
    alone = sparse_kl_teacher_student((hidden @ weight.T)[2:3], ids[2:3, :4], logprobs[2:3, :4], 1.0)
    assert kl[2].item() == pytest.approx(alone.item(), rel=1e-6)
    # Row 5 with nothing stored: KL 0, no NaN anywhere, and the chunked path agrees.
    ids[5], logprobs[5] = -1, -torch.inf
    kl = sparse_kl_teacher_student(hidden @ weight.T, ids, logprobs, 1.0)
    assert kl[5].item() == 0.0 and torch.isfinite(kl).all()
    loss, _, kd = chunked_distillation_loss(
        hidden, weight, labels, weights, 1.0, 1.0, None, SparseTeacher(ids, logprobs)
    )
    assert kd.item() == pytest.approx(weighted_mean(kl, weights).item(), rel=1e-5)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("kind", ["ce", "dense", "sparse"])
def test_a_zero_weight_step_gives_zero_not_nan(kind):
    hidden, weight, labels, _, teacher = _case(kind)
    loss, ce, kd = chunked_distillation_loss(hidden, weight, labels, torch.zeros(N), 0.5, 2.0, None, teacher)
    assert loss.item() == 0.0 and ce.item() == 0.0 and (kd is None or kd.item() == 0.0)
    for g in torch.autograd.grad(loss, (hidden, weight)):
        assert torch.isfinite(g).all() and g.abs().max().item() == 0.0


def test_alpha_zero_ignores_the_teacher():
    hidden, weight, labels, weights, teacher = _case("sparse")
    with_teacher = chunked_distillation_loss(hidden, weight, labels, weights, 0.0, 3.0, None, teacher)
    alone = chunked_distillation_loss(hidden, weight, labels, weights)
    assert with_teacher[2] is None and with_teacher[0].item() == alone[0].item()


def test_default_chunk_bounds_a_chunks_float32_logits():
    # 256 MiB of float32 logits: 441 rows of Qwen's 152,064, cut to a multiple of 8; SmolLM2's 49,152: 1365 -> 1360.
    assert default_chunk_size(152064) == 440 and default_chunk_size(49152) == 1360
    assert 440 * 152064 * 4 <= 256 * 2**20 < 449 * 152064 * 4


def test_bad_inputs_are_errors_that_say_what_is_wrong():
    hidden, weight, labels, weights, teacher = _case("sparse")
    ids = teacher.token_ids.clone()
    ids[9, 1] = V + 5
    with pytest.raises(ValueError, match=r"position 9 has id 55, beyond the student's vocabulary of 50"):
        chunked_distillation_loss(
            hidden, weight, labels, weights, 0.5, 1.0, None, SparseTeacher(ids, teacher.logprobs)
        )
    with pytest.raises(ValueError, match=r"token_weights must be \[N\] = \[37\]"):
        chunked_distillation_loss(hidden, weight, labels, weights[:-1])
    with pytest.raises(ValueError, match="DenseTeacher needs hidden"):
        chunked_distillation_loss(hidden, weight, labels, weights, 0.5, 1.0, None, DenseTeacher(hidden[:3], weight))
