"""What a teacher backend returns for one sample, and the compact entropy summary kept of its logprobs.

The full logprob arrays would be hundreds of floats per token; the build's weighting needs only the mean entropy of
the top-k distribution per token, so that is all a raw row stores, unless sparse KD (`sampling.teacher_topk: K`)
asks for the sampled token ids and the top-K ids and log-probs of every position (`TopK`, records.TOPK_FIELDS).
They are numpy arrays, not Python lists: a part's buffered rows then hold 6 bytes per value, not ~60.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


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
    topk: TopK | None = None  # sparse KD only (sampling.teacher_topk > 0)


@dataclass
class TopK:
    """The teacher's sampled ids and its K most likely tokens per position, as records.TOPK_FIELDS stores them."""

    k: int
    token_ids: np.ndarray  # int32 [T]: the sampled ids, in order
    topk_ids: np.ndarray  # int32 [T * K], row-major [position, rank]
    topk_logprobs: np.ndarray  # float32 [T * K], descending within each position

    @classmethod
    def from_positions(
        cls, k: int, token_ids: Sequence[int], positions: Iterable[Sequence[tuple[int, float]]], where: str
    ) -> TopK:
        """From each position's (token id, logprob) alternatives, in any order and possibly more than k (vLLM adds
        the sampled token when it is not among the top k): the k most likely, most likely first. Refuses, naming
        `where`, a position with fewer than k alternatives or a count of positions other than the tokens'."""
        ids, lps = [], []
        for t, alternatives in enumerate(positions):
            best = sorted(alternatives, key=lambda a: -a[1])[:k]
            if len(best) < k:
                raise ValueError(f"{where}: position {t} has {len(best)} top logprobs, teacher_topk is {k}")
            ids.extend(a[0] for a in best)
            lps.extend(a[1] for a in best)
        if len(ids) != len(token_ids) * k:
            raise ValueError(f"{where}: {len(ids) // k} positions with logprobs for {len(token_ids)} tokens")
        return cls(
            k,
            np.asarray(token_ids, dtype=np.int32),
            np.asarray(ids, dtype=np.int32),
            np.asarray(lps, dtype=np.float32),
        )


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
