"""What a teacher backend returns for one sample, and the compact entropy summary kept of its logprobs.

The full logprob arrays would be hundreds of floats per token; the build's weighting needs only the mean entropy of
the top-k distribution per token, so that is all a raw row stores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class Completion:
    """One sampled answer as a backend returns it, before provenance is attached."""

    sample_index: int
    text: str
    finish_reason: str
    completion_tokens: int | None
    mean_token_entropy: float | None = None
    reasoning_field: str | None = None  # the engine's own reasoning output (vLLM reasoning parser), when present
    think_opened: bool = False  # the rendered prompt ended with <think>: the chat template opened the block


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
