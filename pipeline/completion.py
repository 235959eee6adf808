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
    think_opened: bool = False  # the rendered prompt ended with <think>: the chat template opened the block


def split_reasoning(text: str, reasoning_field: str | None = None, think_opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer): only the text after the think block is the answer, so a tentative answer inside the
    thinking is never judged as the model's conclusion.

    The engine's reasoning field wins when it gave one. Otherwise the block ends at the last closing tag; a completion
    that opened a block and never closed it (a truncated trace) has no answer at all. The block is opened either by a
    `<think>` in the text or by the chat template itself (`think_opened`: the prompt ended with `<think>`, so the text
    carries only the closing tag). Text without tags from a prompt that opened nothing is all answer. Malformed blocks
    are left for the verify stage's filters to judge, not repaired here.
    """
    if reasoning_field:
        return reasoning_field.strip(), text.strip()
    head, close, tail = text.rpartition(THINK_CLOSE)
    if close and THINK_OPEN not in tail:
        reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return reasoning.strip(), tail.strip()
    if THINK_OPEN in text:  # opened (or opened again after the last close) and never closed
        return text.replace(THINK_OPEN, "", 1).strip(), ""
    if think_opened:
        return text.strip(), ""
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
