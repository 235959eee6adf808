"""Judges Python answers by running them in the sandbox, against a HumanEval-style test suite or stdin/stdout cases.

The verdict comes from the harness alone, never from anything the program prints or says about itself, since the
program is what is being judged. A test suite runs in a checker process of its own that calls the candidate's
function across a pipe and compares plain values rebuilt on its side (see suite_harness); stdin/stdout cases compare
the program's output, line by line, with the expected output.

Only the answer part of a completion is judged: code inside the reasoning is a draft, not the answer. A deadline
overrun on the wall clock is retried once with the deadline doubled, since a loaded machine can slow a right answer
past it; running out of CPU time (RLIMIT_CPU) is final.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.records import DATA_FAULT, FAILED, INFRA_ERROR, PASSED
from pipeline.verify.config import CodeConfig
from pipeline.verify.verifiers.base import Verdict, Verifier, VerifyItem, load_reference
from pipeline.verify.verifiers.sandbox import SandboxResult, resolve_isolation, resolve_limits, run_python

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_CPU_LIMIT_EXIT_CODES = {-24, 128 + 24}  # SIGXCPU: killed directly (rlimit), or as reported by bwrap
_EXCERPT_CHARS = 500
_STDERR_TAIL_CHARS = 2000


def extract_program(text: str) -> str | None:
    """The last Python (or untagged) fenced block: models often show a draft first and the final version last."""
    blocks = [code for tag, code in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS and code.strip()]
    return blocks[-1] if blocks else None


def normalize_output(text: str) -> list[str]:
    """Lines with trailing whitespace and trailing blank lines dropped; the line count still has to match."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _test_suite(reference: dict[str, Any]) -> tuple[str, str, str] | None:
    tests, entry_point, prompt = reference.get("tests"), reference.get("entry_point"), reference.get("prompt", "")
    if isinstance(tests, str) and isinstance(entry_point, str) and entry_point.isidentifier():
        return tests, entry_point, prompt if isinstance(prompt, str) else ""
    return None


def _suite_problem(tests: str, prompt: str) -> str | None:
    """Why the suite cannot judge anything (then every answer would fail): it does not compile or defines no check."""
    for name, source in (("tests", tests), ("prompt", prompt)):
        try:
            compile(source, f"<{name}>", "exec")
        except (SyntaxError, ValueError) as exc:
            return f"the reference's {name} are not valid Python: {exc}"
    if not _defines(tests, "check"):
        return "the reference's tests define no check(candidate) function"
    return None


def _cases(reference: dict[str, Any]) -> list[tuple[str, str]] | None:
    cases = reference.get("cases")
    if not isinstance(cases, list) or not cases:
        return None
    pairs = [(case.get("input"), case.get("output")) for case in cases if isinstance(case, dict)]
    if len(pairs) != len(cases) or not all(isinstance(text, str) for pair in pairs for text in pair):
        return None
    return pairs


def _defines(code: str, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*="
    return re.search(pattern, code, re.MULTILINE) is not None


def _reason(reason: str, result: SandboxResult) -> str:
    """A process the kernel killed at the sandbox's memory limit dies like any other, and what fails after it (an
    error, a wrong answer) fails for want of memory: the cgroup tells. The deadline and the output cap stay."""
    return "memory" if result.memory_exceeded and reason not in ("timeout", "output_limit") else reason


def _failure(result: SandboxResult) -> Verdict | None:
    """The verdict for a run that did not end normally; None when it exited with status 0 within its limits."""
    detail: dict[str, Any] = {"isolation": result.isolation, "limits": result.limits}
    if result.setup_error is not None:
        return Verdict(INFRA_ERROR, "sandbox_error", {**detail, "error": result.setup_error[-_STDERR_TAIL_CHARS:]})
    if result.timed_out:
        return Verdict(FAILED, "timeout", {**detail, "limit": "wall_clock"})
    if result.exit_code in _CPU_LIMIT_EXIT_CODES:
        return Verdict(FAILED, "timeout", {**detail, "limit": "cpu"})
    if result.output_exceeded:
        return Verdict(FAILED, "output_limit", detail)
    if result.exit_code != 0:
        stderr_tail = result.stderr[-_STDERR_TAIL_CHARS:]
        reason = "memory" if "MemoryError" in stderr_tail else _reason("runtime_error", result)
        return Verdict(FAILED, reason, {**detail, "exit_code": result.exit_code, "stderr": stderr_tail})
    return None


class CodeVerifier(Verifier):
    """Runs up to cfg.workers programs at once; threads suffice because the work happens in sandbox processes.

    Raises SandboxUnavailable when created where the configured isolation or limits cannot be had, so that a run stops
    before judging anything rather than recording every row as an infrastructure error.
    """

    name = "code"

    def __init__(self, cfg: CodeConfig) -> None:
        self.cfg = cfg
        self.isolation = resolve_isolation(cfg)
        resolve_limits(cfg)
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="code-verifier")

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]:
        return list(self._pool.map(self._verify_safely, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _verify_safely(self, item: VerifyItem) -> Verdict:
        try:
            return self.verify(item)
        except Exception as exc:  # a harness bug must not be scored as a wrong answer
            return Verdict(INFRA_ERROR, "sandbox_error", {"isolation": self.isolation, "error": repr(exc)})

    def verify(self, item: VerifyItem) -> Verdict:
        reference = load_reference(item.reference)
        suite = _test_suite(reference) if isinstance(reference, dict) else None
        cases = _cases(reference) if isinstance(reference, dict) and suite is None else None
        if suite is None and cases is None:
            error = "neither {tests, entry_point} nor a non-empty list of {input, output} string cases"
            return Verdict(DATA_FAULT, "bad_reference", {"isolation": self.isolation, "error": error})
        if suite is not None and (problem := _suite_problem(suite[0], suite[2])) is not None:
            return Verdict(DATA_FAULT, "bad_reference", {"isolation": self.isolation, "error": problem})
        code = extract_program(item.answer)  # never the reasoning: a draft there is not the answer
        if code is None:
            return Verdict(FAILED, "no_code", {"isolation": self.isolation})
        return self._run_suite(code, *suite) if suite is not None else self._run_cases(code, cases)

    def _run(self, start: Callable[[CodeConfig], SandboxResult]) -> tuple[SandboxResult, dict[str, Any]]:
        """Run once; past the wall-clock deadline, once more with it doubled. The detail says what happened."""
        result = start(self.cfg)
        if not result.timed_out:
            return result, {}
        patient = self.cfg.model_copy(update={"timeout_s": 2 * self.cfg.timeout_s})
        return start(patient), {"deadline_retried": True, "deadline_s": patient.timeout_s}

    def _run_suite(self, code: str, tests: str, entry_point: str, prompt: str) -> Verdict:
        if prompt and not _defines(code, entry_point):  # a completion holding only the function body
            code = prompt + ("" if prompt.endswith("\n") else "\n") + code
        suite = {"tests": tests, "entry_point": entry_point, "prompt": prompt}
        result, retried = self._run(lambda cfg: run_python(code, cfg=cfg, suite=suite))
        detail: dict[str, Any] = {"isolation": result.isolation, "limits": result.limits, **retried}
        failure = _failure(result)
        if failure is not None:
            failure.detail.update(retried)
            return failure
        try:
            report = json.loads(result.report)
        except json.JSONDecodeError:  # the checker was killed (by the candidate, say) before it could report
            stderr = result.stderr[-_STDERR_TAIL_CHARS:]
            error = {"error": "the tests did not finish", "stderr": stderr}
            return Verdict(FAILED, _reason("runtime_error", result), {**detail, **error})
        if report["passed"]:
            return Verdict(PASSED, "correct", detail)
        return Verdict(FAILED, _reason(report["reason"], result), {**detail, "error": report["error"]})

    def _run_cases(self, code: str, cases: list[tuple[str, str]]) -> Verdict:
        detail: dict[str, Any] = {"isolation": self.isolation}
        for index, (stdin, expected) in enumerate(cases):
            result, retried = self._run(lambda cfg, stdin=stdin: run_python(code, stdin, cfg=cfg))
            detail |= {"isolation": result.isolation, "limits": result.limits, **retried}
            failure = _failure(result)
            if failure is not None:
                failure.detail |= {**retried, "case": index}
                return failure
            if normalize_output(result.stdout) != normalize_output(expected):
                excerpts = {"expected": expected[:_EXCERPT_CHARS], "got": result.stdout[:_EXCERPT_CHARS]}
                return Verdict(FAILED, _reason("wrong_output", result), {**detail, "case": index, **excerpts})
        return Verdict(PASSED, "correct", {**detail, "cases": len(cases)})
