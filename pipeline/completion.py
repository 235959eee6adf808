"""What is kept of one completion: reasoning and answer split, and a compact entropy summary of its logprobs.

The full logprob arrays would be hundreds of floats per token; the weighting stage only needs the mean entropy of the
top-k distribution per token, so that is all we store (DESIGN.md, "Weighting").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Completion:
    """One sampled answer as a backend returns it, before provenance is attached."""

    sample_index: int
    text: str
    finish_reason: str
    completion_tokens: int | None
    mean_token_entropy: float | None = None
    reasoning_field: str | None = None  # the engine's own reasoning output (vLLM reasoning parser), when present


def split_reasoning(text: str, reasoning_field: str | None = None) -> tuple[str, str]:
    """(reasoning, answer): the engine's reasoning field if it gave one, else an inline <think>...</think> block.

    A completion whose template opened the think block carries only the closing tag; text without tags is all
    answer. Malformed blocks are left for the verify stage's filters to judge, not repaired here.
    """
    if reasoning_field:
        return reasoning_field.strip(), text.strip()
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return reasoning.strip(), tail.strip()
    return "", text.strip()


def topk_entropy(logprobs: Sequence[float]) -> float:
    """Entropy (nats) of the top-k distribution renormalized to sum to one."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return -sum((w / total) * math.log(w / total) for w in weights if w > 0)


def mean_topk_entropy(per_token: Iterable[Sequence[float]], k: int) -> float | None:
    """Mean over tokens of the entropy of each token's k most likely alternatives; None without logprobs."""
    values = [topk_entropy(sorted(lps, reverse=True)[:k]) for lps in per_token if lps]
    return sum(values) / len(values) if values else None
