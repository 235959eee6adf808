"""Verifiers by domain: the one registry worth having (open-r1's rewards.py shape).

Each verifier is created on first use, because the math pool and the code sandbox start processes.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.verify.config import VerifyConfig
from pipeline.verify.verifiers.base import Verifier


def _math(cfg: VerifyConfig) -> Verifier:
    from pipeline.verify.verifiers.math import MathVerifier

    return MathVerifier(cfg.math)


def _code(cfg: VerifyConfig) -> Verifier:
    from pipeline.verify.verifiers.code import CodeVerifier

    return CodeVerifier(cfg.code)


def _simple(name: str) -> Callable[[VerifyConfig], Verifier]:
    def make(cfg: VerifyConfig) -> Verifier:
        from pipeline.verify.verifiers import simple

        return {"gym": simple.GymVerifier, "mcq": simple.McqVerifier, "text": simple.TextVerifier}[name]()

    return make


VERIFIERS: dict[str, Callable[[VerifyConfig], Verifier]] = {
    "math": _math,
    "code": _code,
    "gym": _simple("gym"),
    "mcq": _simple("mcq"),
    "text": _simple("text"),
}


class VerifierSet:
    """Creates each domain's verifier once and closes them all at the end."""

    def __init__(self, cfg: VerifyConfig):
        self._cfg = cfg
        self._made: dict[str, Verifier] = {}

    def get(self, domain: str) -> Verifier:
        if domain not in self._made:
            self._made[domain] = VERIFIERS[domain](self._cfg)
        return self._made[domain]

    def close(self) -> None:
        for verifier in self._made.values():
            verifier.close()

    def __enter__(self) -> VerifierSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
