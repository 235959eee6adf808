"""Verifiers that need no pool: reasoning-gym's own scorers, multiple-choice letters, normalized exact match.

reasoning-gym ships a `score_answer` per task (partial credit in [0, 1]); a sample passes only with full credit,
because a half-right answer is still a wrong answer to teach. Only the answer part of a completion is read: a
completion with no answer after its think block has no answer, whatever its thinking tried.
"""

from __future__ import annotations

import json
import re
import string
from collections import OrderedDict
from typing import Any

from pipeline.records import DATA_FAULT, FAILED, PASSED
from pipeline.verify.verifiers.base import ItemVerifier, Verdict, VerifyItem, load_reference
from pipeline.verify.verifiers.math import extract_answer

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
GYM_REFERENCE_KEYS = ("task", "config", "seed", "size", "index", "question", "answer")
GYM_ENTRY_CACHE = 4096  # entries kept for the n samples of a problem, which arrive together


def final_answer(text: str) -> str | None:
    """reasoning-gym's own <answer>X</answer>, else the math verifier's extraction (last \\boxed{}, else a final
    "Answer: X" / "The answer is X" line), so every domain reads answers the same way."""
    tagged = _ANSWER_TAG.findall(text)
    return tagged[-1].strip() if tagged else extract_answer(text)


class GymVerifier(ItemVerifier):
    """Scores with the task built from the recipe's own config, on the original entry regenerated from its seed and
    index: a scorer may read its config (a tolerance, the allowed numbers) or entry metadata that JSON cannot carry
    (tuples, sets, objects), so neither a default-config task nor a JSON copy of the entry may judge."""

    name = "gym"

    def __init__(self) -> None:
        self._datasets: dict[str, Any] = {}
        self._entries: OrderedDict[tuple[str, int], dict] = OrderedDict()

    def _entry(self, ref: dict) -> tuple[Any, dict]:
        key = json.dumps([ref["task"], ref["config"], ref["seed"], ref["size"]], sort_keys=True)
        if key not in self._datasets:
            import reasoning_gym

            self._datasets[key] = reasoning_gym.create_dataset(
                ref["task"], size=ref["size"], seed=ref["seed"], **ref["config"]
            )
        dataset = self._datasets[key]
        if (key, ref["index"]) not in self._entries:
            self._entries[(key, ref["index"])] = dataset[ref["index"]]
            while len(self._entries) > GYM_ENTRY_CACHE:
                self._entries.popitem(last=False)
        return dataset, self._entries[(key, ref["index"])]

    def verify_one(self, item: VerifyItem) -> Verdict:
        ref = load_reference(item.reference)
        if not isinstance(ref, dict) or any(k not in ref for k in GYM_REFERENCE_KEYS):
            # References written before the task config was stored cannot be scored faithfully: generate them again.
            detail = {"reference": item.reference[:200], "expected_keys": list(GYM_REFERENCE_KEYS)}
            return Verdict(DATA_FAULT, "bad_reference", detail)
        try:
            dataset, entry = self._entry(ref)
        except Exception as e:  # an unknown task, a config the task refuses, an index out of range: the data's
            return Verdict(DATA_FAULT, "bad_reference", {"error": repr(e)[:500]})
        same_answer = json.dumps(entry["answer"], default=str) == json.dumps(ref["answer"], default=str)
        if entry["question"] != ref["question"] or not same_answer:
            # Another reasoning-gym version generates other problems from the same seed: the answer is to a
            # question the scorer no longer knows.
            return Verdict(DATA_FAULT, "reference_mismatch", {"regenerated_question": entry["question"][:200]})
        answer = final_answer(item.answer)
        if answer is None:
            return Verdict(FAILED, "no_answer")
        try:
            score = float(dataset.score_answer(answer, entry))
        except Exception as e:  # deterministic for this entry and answer: a retry would fail the same way
            return Verdict(DATA_FAULT, "scorer_error", {"error": repr(e)[:500], "extracted": answer[:500]})
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
            return Verdict(DATA_FAULT, "bad_reference", {"reference": item.reference[:200]})
        answer = final_answer(item.answer)
        match = _LETTER.match(answer.strip()) if answer else None
        if match is None:
            return Verdict(FAILED, "no_answer", {"extracted": (answer or "")[:200]})
        chosen = match.group(1).upper()
        ok = chosen == gold.strip().upper()
        return Verdict(PASSED if ok else FAILED, "correct" if ok else "wrong_answer", {"extracted": chosen})


def normalize_for_text_verdict(text: str) -> str:
    """SQuAD-style normalization for judging a free-text answer against its reference: case, punctuation, articles
    and spacing do not make an answer wrong.

    Articles go because "the Nile" answers "Nile"; the build's `normalize_for_dedup` keeps them (it asks whether two
    texts are the same, not whether an answer is right), and the voting key `normalize_for_voting` keeps punctuation,
    which is part of a math answer.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class TextVerifier(ItemVerifier):
    name = "text"

    def verify_one(self, item: VerifyItem) -> Verdict:
        if not normalize_for_text_verdict(item.reference):
            return Verdict(DATA_FAULT, "bad_reference", {"reference": item.reference[:200]})
        answer = final_answer(item.answer)
        if answer is None:
            lines = [line for line in item.answer.splitlines() if line.strip()]
            answer = lines[-1] if lines else None
        if answer is None:
            return Verdict(FAILED, "no_answer")
        ok = normalize_for_text_verdict(answer) == normalize_for_text_verdict(item.reference)
        return Verdict(PASSED if ok else FAILED, "correct" if ok else "wrong_answer", {"extracted": answer[:500]})
