"""What every verifier returns, and the one interface the verify stage calls.

Three outcomes are kept apart (DESIGN.md, "Reliability rules"): `passed`, `failed` (the answer is wrong) and
`infra_error` (the sandbox, a worker or the verifier itself broke). An infrastructure failure is never scored as a
wrong answer: the verify stage leaves such rows to be verified again on its next run.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

PASSED, FAILED, INFRA_ERROR = "passed", "failed", "infra_error"


@dataclass
class Verdict:
    status: str  # PASSED | FAILED | INFRA_ERROR
    reason: str  # short and machine-readable: "correct", "wrong_answer", "no_answer", "timeout", "runtime_error", ...
    detail: dict[str, Any] = field(default_factory=dict)  # JSON-able: extracted answer, isolation used, stderr tail

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class VerifyItem:
    """One completion to judge. `answer` is the text after the think block (the whole text when there is none)."""

    completion: str
    answer: str
    reference: str


class Verifier(ABC):
    """Judges a batch at a time so that a verifier can spread the work over its own pool of processes."""

    name: str = ""

    @abstractmethod
    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]: ...

    def close(self) -> None:  # noqa: B027 - verifiers without a pool hold nothing
        """Stop worker processes; safe to call twice."""

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ItemVerifier(Verifier):
    """A verifier cheap enough to judge one item at a time in the calling process."""

    @abstractmethod
    def verify_one(self, item: VerifyItem) -> Verdict: ...

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]:
        return [self.verify_one(item) for item in items]


def load_reference(reference: str) -> Any:
    """A reference is JSON text, or JSON text of a JSON string (some datasets double-encode); plain text stays text."""
    value: Any = reference
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            break
    return value
