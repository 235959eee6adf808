"""What every verifier returns, and the one interface the verify stage calls.

Four outcomes are kept apart: `passed`, `failed` (the answer is wrong), `infra_error` (the sandbox, a worker or the
verifier itself broke: a retry can fix it, so the verify stage verifies such rows again on its next run) and
`data_fault` (the reference itself cannot be read or scored: final, counted per reason, excluded from training,
never redone). An infrastructure failure or a data fault is never scored as a wrong answer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import PASSED


@dataclass
class Verdict:
    status: str  # PASSED | FAILED | INFRA_ERROR | DATA_FAULT
    reason: str  # short and machine-readable: "correct", "wrong_answer", "no_answer", "timeout", "runtime_error", ...
    detail: dict[str, Any] = field(default_factory=dict)  # JSON-able: extracted answer, isolation used, stderr tail

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class VerifyItem:
    """One completion to judge. `answer` is the text after the think block (records.split_reasoning): empty when
    the block never closed, the whole text when there was none. Verifiers read only `answer`."""

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
