"""Per-sample loss weights from the teacher's uncertainty.

Per sample: the mean token entropy of the top-K logprobs normalized by log K, h, gives the weight w = 1 - h^beta. Per
problem: the pass rate over its n samples, and the agreement of their final answers (1 minus the entropy of the answer
distribution over log n). The build turns these into the dataset's `weight` column, normalized to mean 1, which SFT
can use as a per-sample loss weight.

A completion the teacher wrote with flat token distributions, or a problem whose samples disagree on the answer, is
weaker evidence of the right reasoning; the dataset builder down-weights it rather than dropping it. Everything here is
a pure function of stored columns, so weights can be recomputed under another mode without regenerating anything.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from pipeline.records import DATA_FAULT, FAILED, INFRA_ERROR, PASSED

MODES = ("sample", "sample_x_agreement", "uniform")
# Domains whose verdicts carry a final answer that two samples can share; a program has none to compare.
ANSWER_DOMAINS = frozenset({"math", "gym", "mcq", "text"})

_BOXED = re.compile(r"\\boxed\s*\{")
_WHITESPACE = re.compile(r"\s+")


def normalized_entropy(mean_token_entropy: float | None, top_k: int | None) -> float | None:
    """H / log K: top-K entropy is bounded by log K, so dividing makes runs with different K comparable."""
    if mean_token_entropy is None or top_k is None or top_k < 2 or math.isnan(mean_token_entropy):
        return None  # NaN would otherwise clip to 0 and claim full certainty
    return min(1.0, max(0.0, mean_token_entropy / math.log(top_k)))


def sample_weight(h: float | None, beta: float = 1.0) -> float:
    """1 - h^beta; beta > 1 spares moderately unsure samples and only punishes near-uniform ones.

    No logprobs (h None) is no evidence of uncertainty, so the sample keeps full weight.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if h is None:
        return 1.0
    return 1.0 - h**beta


def pass_rate(statuses: Sequence[str]) -> float | None:
    """Share of judged samples that passed; an infrastructure failure or a data fault (an unreadable reference) says
    nothing about difficulty, so skip it."""
    counts = Counter(statuses)
    known = (PASSED, FAILED, INFRA_ERROR, DATA_FAULT)
    unknown = set(counts) - set(known)
    if unknown:
        raise ValueError(f"unknown verdict status(es) {sorted(unknown)}; expected one of {', '.join(known)}")
    judged = counts[PASSED] + counts[FAILED]
    return counts[PASSED] / judged if judged else None


def _unbox(text: str) -> str:
    """Drop a \\boxed{...} only when it wraps the whole answer: "\\boxed{a}+\\boxed{b}" is not one boxed answer."""
    match = _BOXED.match(text)
    if not match:
        return text
    depth = 0
    for i in range(match.end() - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[match.end() : i] if i == len(text) - 1 else text
    return text  # unbalanced: leave it for exact comparison


def normalize_for_voting(answer: str) -> str:
    """The key under which final answers are counted as the same, for answer agreement here and cons@k voting in
    the eval: a light canonical form so formatting noise ("$\\boxed{12}$." vs "12") does not read as disagreement.

    Light on purpose: case, signs and operators stay, since "-x" and "x" (or "A" and "a" in an expression) are
    different answers; the build's `normalize_for_dedup` and the text verifier's `normalize_for_text_verdict` fold
    punctuation away and could not tell them apart.
    """
    previous = None
    text = answer
    while text != previous:
        previous = text
        text = _WHITESPACE.sub(" ", text).strip()
        text = text.removesuffix(".").strip()
        if len(text) >= 2 and text.startswith("$") and text.endswith("$") and "$" not in text.strip("$"):
            text = text.strip("$")  # "$a$ and $b$" is two formulas, not one wrapped answer
        text = _unbox(text)
    return text


def answer_agreement(answers: Sequence[str | None]) -> float:
    """1 - H(final-answer distribution) / log n: 1 when all n samples agree, 0 when all differ.

    Each None counts as its own distinct answer, since an unreadable answer agrees with nothing.
    """
    n = len(answers)
    if n <= 1:
        return 1.0
    counts = Counter(normalize_for_voting(a) for a in answers if a is not None)
    sizes = [*counts.values(), *([1] * sum(a is None for a in answers))]
    entropy = -sum(c / n * math.log(c / n) for c in sizes)
    return min(1.0, max(0.0, 1.0 - entropy / math.log(n)))


def problem_agreement(domain: str, answers: Sequence[str | None]) -> float | None:
    """`answer_agreement` where final answers are comparable; None (undefined) for a domain without them (code).

    Code samples extract no answer, so each would count as its own and every problem would read as total
    disagreement: a weight of 0 for every code sample, whatever the teacher's certainty.
    """
    return answer_agreement(answers) if domain in ANSWER_DOMAINS else None


def combine(sample_w: float, agreement: float | None, pass_rate: float | None, mode: str = "sample") -> float:
    """One raw weight per sample under the chosen mode.

    Undefined agreement (None: no comparable final answers) is a neutral factor of 1 in `sample_x_agreement`, so
    such a sample is weighted by its own certainty alone, as under `sample`. pass_rate is accepted so callers pass
    every per-problem signal uniformly; no current mode uses it.
    """
    if mode == "sample":
        return sample_w
    if mode == "sample_x_agreement":
        return sample_w * (1.0 if agreement is None else agreement)
    if mode == "uniform":
        return 1.0
    raise ValueError(f"unknown weighting mode {mode!r}; valid modes: {', '.join(MODES)}")


def scale(weight: float, mean: float) -> float:
    """weight / mean for streaming builds where the mean came from a first pass.

    A zero mean means every weight was zero: there is no relative signal left, so fall back to uniform.
    """
    return weight / mean if mean > 0 else 1.0


def normalize_to_mean_one(weights: Sequence[float]) -> list[float]:
    """Mean 1 keeps the effective learning rate the same as unweighted training; ratios are unchanged."""
    if not weights:
        return []
    mean = math.fsum(weights) / len(weights)
    return [scale(w, mean) for w in weights]
