"""Accuracy under DeepSeek-R1's evaluation protocol: k samples per problem, pass@1 averaged over them, cons@k.

pass@1 = mean over problems of (correct samples / k): the unbiased pass@1 estimator of Chen et al. (2021) for k
samples. Its standard error is the sample standard deviation of the per-problem rates over sqrt(problems), so a
reader sees when two models are within noise; a per-problem rate already averages the k samples, so problems, not
samples, are the independent draws. cons@k is the majority vote: a problem counts as solved when its most frequent
final answer (normalized as the weighting does) was judged correct.

A problem without a scored sample (too long for the model, or its generation failed) counts as failed in every
score, never leaves the denominator: models compared on a benchmark are scored on the same problems, so retention
divides like by like. The caller reports how many each model left unanswered.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.build.weighting import normalize_for_voting


@dataclass(frozen=True)
class Sample:
    """One scored completion: its verdict and the final answer the verifier read (None when it found none)."""

    passed: bool
    answer: str | None = None


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float
    problems: int


def pass_at_1(problems: Sequence[Sequence[Sample]]) -> Score:
    """Mean over problems of the fraction of their samples judged correct (0 for a problem without samples)."""
    rates = [sum(s.passed for s in samples) / len(samples) if samples else 0.0 for samples in problems]
    return _mean_with_stderr(rates)


def majority_vote(samples: Sequence[Sample]) -> Sample | None:
    """The first sample carrying the most frequent normalized answer; ties go to the answer seen first.

    Samples without an answer do not vote; None when no sample has one.
    """
    voted = [(normalize_for_voting(s.answer), s) for s in samples if s.answer is not None]
    if not voted:
        return None
    counts = Counter(key for key, _ in voted)
    top = max(counts.values())
    return next(s for key, s in voted if counts[key] == top)


def cons_at_k(problems: Sequence[Sequence[Sample]]) -> Score:
    """Share of problems whose majority answer is correct (a problem with no answer at all counts as wrong)."""
    winners = [majority_vote(samples) for samples in problems]
    return _mean_with_stderr([float(w is not None and w.passed) for w in winners])


def _mean_with_stderr(values: Sequence[float]) -> Score:
    n = len(values)
    if n == 0:
        return Score(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Score(mean, math.nan, 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Score(mean, math.sqrt(variance / n), n)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]; nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class ModelRun:
    """One model's scored samples, grouped benchmark -> problem -> samples, and what serving it cost."""

    label: str
    model: str
    revision: str
    run_dir: Path
    # Every frozen problem has an entry; an empty list is a problem left unanswered (scored as failed).
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)  # benchmark -> domain of its problems
    unscored: int = 0  # samples whose verdict is an infrastructure error (retried by the next run)
    infra_errors: int = 0  # problems the engine failed on in this call (retried by the next run)
    unanswered: int = 0  # problems without a scored sample: infrastructure errors, prompts too long for the model
    data_faults: set[str] = field(default_factory=set)  # problems whose reference no verifier can read: not scored
    performance: dict = field(default_factory=dict)
