"""Verifiers that need no pool: reasoning-gym's own scorers, multiple-choice letters, normalized exact match.

reasoning-gym ships a `score_answer` per task (partial credit in [0, 1]); a sample passes only with full credit,
because a half-right answer is still a wrong answer to teach.
"""

from __future__ import annotations

import re
import string
from typing import Any

from pipeline.verifiers.base import FAILED, INFRA_ERROR, PASSED, ItemVerifier, Verdict, VerifyItem, load_reference
from pipeline.verifiers.math import extract_answer

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def final_answer(text: str) -> str | None:
    """reasoning-gym's own <answer>X</answer>, else the math verifier's extraction (last \\boxed{}, else a final
    "Answer: X" / "The answer is X" line), so every domain reads answers the same way."""
    tagged = _ANSWER_TAG.findall(text)
    return tagged[-1].strip() if tagged else extract_answer(text)


def _extract(item: VerifyItem) -> str | None:
    return final_answer(item.answer) or final_answer(item.completion)


class GymVerifier(ItemVerifier):
    name = "gym"

    def __init__(self) -> None:
        self._scorers: dict[str, Any] = {}

    def _scorer(self, task: str):
        if task not in self._scorers:
            import reasoning_gym

            self._scorers[task] = reasoning_gym.get_score_answer_fn(task)
        return self._scorers[task]

    def verify_one(self, item: VerifyItem) -> Verdict:
        reference = load_reference(item.reference)
        if not isinstance(reference, dict) or "task" not in reference or "entry" not in reference:
            return Verdict(INFRA_ERROR, "bad_reference", {"reference": item.reference[:200]})
        answer = _extract(item)
        if answer is None:
            return Verdict(FAILED, "no_answer")
        try:
            score = float(self._scorer(reference["task"])(answer, reference["entry"]))
        except Exception as e:  # a scorer bug is the verifier's failure, not the teacher's
            return Verdict(INFRA_ERROR, "scorer_error", {"error": repr(e)[:500], "extracted": answer[:500]})
        status, reason = (PASSED, "correct") if score >= 1.0 else (FAILED, "wrong_answer")
        return Verdict(status, reason, {"extracted": answer[:500], "score": score})


_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.):]?(?:\s|$)")


class McqVerifier(ItemVerifier):
    """The reference is the correct letter ("B") or {"answer": "B"}; the final answer must start with it."""

    name = "mcq"

    def verify_one(self, item: VerifyItem) -> Verdict:
        reference = load_reference(item.reference)
        gold = reference.get("answer") if isinstance(reference, dict) else reference
        if not isinstance(gold, str) or not re.fullmatch(r"\s*[A-Za-z]\s*", gold):
            return Verdict(INFRA_ERROR, "bad_reference", {"reference": item.reference[:200]})
        answer = _extract(item)
        match = _LETTER.match(answer.strip()) if answer else None
        if match is None:
            return Verdict(FAILED, "no_answer", {"extracted": (answer or "")[:200]})
        chosen = match.group(1).upper()
        ok = chosen == gold.strip().upper()
        return Verdict(PASSED if ok else FAILED, "correct" if ok else "wrong_answer", {"extracted": chosen})


def normalize_text(text: str) -> str:
    """SQuAD-style normalization: case, punctuation, articles and spacing do not make an answer wrong."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class TextVerifier(ItemVerifier):
    name = "text"

    def verify_one(self, item: VerifyItem) -> Verdict:
        answer = _extract(item)
        if answer is None:
            lines = [line for line in item.answer.splitlines() if line.strip()]
            answer = lines[-1] if lines else None
        if answer is None:
            return Verdict(FAILED, "no_answer")
        ok = normalize_text(answer) == normalize_text(item.reference)
        return Verdict(PASSED if ok else FAILED, "correct" if ok else "wrong_answer", {"extracted": answer[:500]})
