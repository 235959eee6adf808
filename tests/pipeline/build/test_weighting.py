"""Weighting formulas (entropy weight, pass rate, answer agreement, modes, mean-one scaling) against hand-computed
values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.build.weighting import (
    MODES,
    answer_agreement,
    combine,
    normalize_for_voting,
    normalize_to_mean_one,
    normalized_entropy,
    pass_rate,
    problem_agreement,
    sample_weight,
    scale,
)

# ---- normalized_entropy / sample_weight


def test_normalized_entropy_divides_by_log_k():
    # H = 0.8 nats, K = 5 -> h = 0.8 / ln 5 = 0.8 / 1.60944 = 0.49707
    assert normalized_entropy(0.8, 5) == pytest.approx(0.49707, abs=1e-5)
    # H = 1.2 nats, K = 10 -> h = 1.2 / ln 10 = 1.2 / 2.30259 = 0.52115
    assert normalized_entropy(1.2, 10) == pytest.approx(0.52115, abs=1e-5)


def test_normalized_entropy_is_clipped_to_unit_interval():
    # ln 2 = 0.69315 is the maximum for K = 2; anything above (rounding in the teacher) clips to 1
    assert normalized_entropy(math.log(2), 2) == pytest.approx(1.0)
    assert normalized_entropy(0.9, 2) == 1.0
    assert normalized_entropy(-1e-9, 5) == 0.0
    assert normalized_entropy(0.0, 5) == 0.0


@pytest.mark.parametrize(("entropy", "k"), [(None, 5), (0.8, None), (None, None), (0.0, 1), (0.3, 0), (math.nan, 5)])
def test_normalized_entropy_is_none_without_usable_logprobs(entropy, k):
    assert normalized_entropy(entropy, k) is None


def test_sample_weight_formula():
    # h = 0.49707, beta = 2 -> h^2 = 0.24708 -> w = 1 - 0.24708 = 0.75292
    assert sample_weight(0.8 / math.log(5), beta=2) == pytest.approx(0.75292, abs=1e-5)
    # h = 0.52115, beta = 1 -> w = 0.47885
    assert sample_weight(1.2 / math.log(10)) == pytest.approx(0.47885, abs=1e-5)
    # h = 0.52115, beta = 0.5 -> sqrt(h) = 0.72191 -> w = 0.27809
    assert sample_weight(1.2 / math.log(10), beta=0.5) == pytest.approx(0.27809, abs=1e-5)
    assert sample_weight(0.0) == 1.0
    assert sample_weight(1.0, beta=3) == 0.0


def test_sample_weight_without_logprobs_is_full():
    assert sample_weight(None) == 1.0
    assert sample_weight(None, beta=4) == 1.0


@pytest.mark.parametrize("beta", [0, -1.0, math.nan])
def test_sample_weight_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        sample_weight(0.5, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        sample_weight(None, beta=beta)


# ---- pass_rate


def test_pass_rate_excludes_infra_errors():
    # 2 passed, 1 failed, 2 infra_error -> 2 / (2 + 1) = 0.66667
    assert pass_rate(["passed", "infra_error", "failed", "passed", "infra_error"]) == pytest.approx(2 / 3)
    assert pass_rate(["passed", "passed"]) == 1.0
    assert pass_rate(["failed", "failed", "failed", "passed"]) == 0.25


def test_pass_rate_is_none_when_nothing_judged():
    assert pass_rate([]) is None
    assert pass_rate(["infra_error", "infra_error"]) is None


def test_pass_rate_rejects_unknown_status():
    with pytest.raises(ValueError, match="unknown verdict"):
        pass_rate(["passed", "timeout"])


# ---- answer_agreement


def test_answer_agreement_formula():
    # ["12","12","13","12"]: p = (3/4, 1/4), H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.21576 + 0.34657 = 0.56234
    # H / ln 4 = 0.56234 / 1.38629 = 0.40564 -> agreement 0.59436
    assert answer_agreement(["12", "12", "13", "12"]) == pytest.approx(0.59436, abs=1e-5)
    # ["a","a","b","c"]: p = (1/2, 1/4, 1/4), H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 = 1.03972; ln 4 = 2 ln 2
    # -> H / ln 4 = 0.75 -> agreement 0.25
    assert answer_agreement(["a", "a", "b", "c"]) == pytest.approx(0.25)
    # ["7","7","8"]: p = (2/3, 1/3), H = 0.27031 + 0.36620 = 0.63651, / ln 3 = 1.09861 -> 0.57938 -> 0.42062
    assert answer_agreement(["7", "7", "8"]) == pytest.approx(0.42062, abs=1e-5)


def test_answer_agreement_extremes():
    assert answer_agreement(["5", "5", "5", "5"]) == 1.0
    assert answer_agreement(["1", "2", "3", "4"]) == pytest.approx(0.0, abs=1e-12)
    assert answer_agreement(["5"]) == 1.0
    assert answer_agreement([None]) == 1.0
    assert answer_agreement([]) == 1.0


def test_none_answers_each_count_as_distinct():
    # [None, None] is two distinct answers: p = (1/2, 1/2), H = ln 2 = ln n -> agreement 0
    assert answer_agreement([None, None]) == pytest.approx(0.0, abs=1e-12)
    # ["12","12",None,None]: p = (1/2, 1/4, 1/4) as for ["a","a","b","c"] -> 0.25
    assert answer_agreement(["12", "12", None, None]) == pytest.approx(0.25)
    # A None never matches a literal "None" answer either
    assert answer_agreement(["None", None]) == pytest.approx(0.0, abs=1e-12)


def test_answer_agreement_normalizes_formatting():
    assert answer_agreement(["\\boxed{12}", "12.", " 12 ", "$12$"]) == 1.0
    # Same as ["12","12","13","12"] once formatting is stripped
    assert answer_agreement(["$\\boxed{12}$.", "12", "\\boxed{13}", "12."]) == pytest.approx(0.59436, abs=1e-5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\boxed{12}", "12"),
        ("12.", "12"),
        ("  x  +\n  1 ", "x + 1"),
        ("$\\boxed{12}$.", "12"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$$3.5$$", "3.5"),
        ("3.5.", "3.5"),
    ],
)
def test_normalize_for_voting(raw, expected):
    assert normalize_for_voting(raw) == expected


@pytest.mark.parametrize("raw", ["\\boxed{a}+\\boxed{b}", "$a$ and $b$", "\\boxed{12", "12", "-3", "The Nile"])
def test_normalize_for_voting_keeps_what_is_not_one_wrapped_answer(raw):
    assert normalize_for_voting(raw) == raw


# ---- combine


def test_combine_modes():
    assert combine(0.75, 0.5, 0.25, mode="sample") == 0.75
    assert combine(0.75, 0.5, 0.25) == 0.75
    assert combine(0.75, 0.5, None, mode="sample_x_agreement") == pytest.approx(0.375)
    assert combine(0.1, 0.0, 0.0, mode="uniform") == 1.0


def test_combine_rejects_unknown_mode_naming_valid_ones():
    with pytest.raises(ValueError) as err:
        combine(1.0, 1.0, 1.0, mode="entropy")
    assert all(mode in str(err.value) for mode in MODES)


# ---- normalization


def test_normalize_to_mean_one_has_mean_one_and_keeps_ratios():
    weights = [0.75292, 0.47885, 0.27809, 1.0, 0.0, 0.1]
    out = normalize_to_mean_one(weights)
    assert abs(math.fsum(out) / len(out) - 1.0) < 1e-12
    for w, o in zip(weights, out, strict=True):
        assert o == pytest.approx(w * len(weights) / sum(weights), rel=1e-12)
    assert out[0] / out[1] == pytest.approx(0.75292 / 0.47885, rel=1e-12)
    assert out[4] == 0.0


def test_normalize_to_mean_one_edge_cases():
    assert normalize_to_mean_one([]) == []
    assert normalize_to_mean_one([0.0, 0.0, 0.0]) == [1.0, 1.0, 1.0]
    # [1, 3] has mean 2 -> [0.5, 1.5]
    assert normalize_to_mean_one([1.0, 3.0]) == [0.5, 1.5]
    assert normalize_to_mean_one([0.4]) == [1.0]


def test_scale_matches_batch_normalization():
    weights = [0.2, 0.9, 0.4]
    mean = sum(weights) / 3  # 0.5
    assert [scale(w, mean) for w in weights] == pytest.approx(normalize_to_mean_one(weights), rel=1e-12)
    assert scale(0.2, 0.5) == pytest.approx(0.4)
    assert scale(0.0, 0.0) == 1.0
    assert scale(0.7, 0.0) == 1.0


# ---- code: no comparable final answer


def test_undefined_agreement_is_a_neutral_factor():
    assert problem_agreement("code", [None, None, None]) is None
    assert problem_agreement("math", [None, None]) == 0.0  # math answers are comparable: two unreadable disagree
    assert combine(0.75, None, 0.5, mode="sample_x_agreement") == 0.75


def test_sample_x_agreement_keeps_code_samples_weighted_by_their_certainty():
    """Two passing programs (no extracted answer) of entropies 0.4 and 0.8 nats, K = 5: weights 1 - H / ln 5."""
    from pipeline.build.config import BuildConfig
    from pipeline.build.selection import Selector

    rows = [
        {
            "problem_id": "c1",
            "sample_index": i,
            "source": "humaneval",
            "domain": "code",
            "prompt": "def f(): ...",
            "reference": "{}",
            "messages": None,
            "reasoning": f"plan {i}",
            "answer": f"```python\ndef f():\n    return {i}\n```",
            "status": "passed",
            "failed_filters": [],
            "verdict_detail": json.dumps({"isolation": "bwrap"}),
            "mean_token_entropy": entropy,
            "entropy_top_k": 5,
            "completion_tokens": 10,
        }
        for i, entropy in enumerate((0.4, 0.8))
    ]
    selector = Selector(BuildConfig(weighting="sample_x_agreement", near_dup_threshold=None), Path("."))
    kept = [row for row, reason in selector.select(rows) if reason is None]
    assert [r["weight"] for r in kept] == pytest.approx([1 - 0.4 / math.log(5), 1 - 0.8 / math.log(5)])
    assert [r["answer_agreement"] for r in kept] == [None, None]
