"""Judges Python answers by running them in the sandbox, against a HumanEval-style test suite or stdin/stdout cases.

The verdict comes from the harness alone (exit status, compared output), never from anything the program says about
itself, since the program is what is being judged. Exit status 0 alone is not enough for a test suite: a program can
exit early (`sys.exit(0)`, `os._exit(0)`) before `check(...)` runs. So the harness writes a fresh random token after
`check(...)` returns, and a run passes only if the token shows up. The token is in the program file, so a program set
on reading its own source could still forge it: this stops the easy reward hacks, not a determined adversary."""

from __future__ import annotations

import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.verifiers.base import FAILED, INFRA_ERROR, PASSED, Verdict, Verifier, VerifyItem, load_reference
from pipeline.verifiers.sandbox import SandboxResult, available_isolation, run_python
from pipeline.verify_config import CodeConfig

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


def _failure(result: SandboxResult) -> Verdict | None:
    """The verdict for a run that did not end normally; None when it exited with status 0 within its limits."""
    detail: dict[str, Any] = {"isolation": result.isolation}
    if result.setup_error is not None:
        return Verdict(INFRA_ERROR, "sandbox_error", {**detail, "error": result.setup_error[-_STDERR_TAIL_CHARS:]})
    if result.timed_out or result.exit_code in _CPU_LIMIT_EXIT_CODES:
        return Verdict(FAILED, "timeout", detail)
    if result.output_exceeded:
        return Verdict(FAILED, "output_limit", detail)
    if result.exit_code != 0:
        stderr_tail = result.stderr[-_STDERR_TAIL_CHARS:]
        reason = "memory" if "MemoryError" in stderr_tail else "runtime_error"
        return Verdict(FAILED, reason, {**detail, "exit_code": result.exit_code, "stderr": stderr_tail})
    return None


class CodeVerifier(Verifier):
    """Runs up to cfg.workers programs at once; threads suffice because the work happens in sandbox processes."""

    name = "code"

    def __init__(self, cfg: CodeConfig) -> None:
        self.cfg = cfg
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="code-verifier")

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]:
        return list(self._pool.map(self._verify_safely, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _verify_safely(self, item: VerifyItem) -> Verdict:
        try:
            return self.verify(item)
        except Exception as exc:  # a harness bug must not be scored as a wrong answer
            return Verdict(INFRA_ERROR, "sandbox_error", {"isolation": self._isolation(), "error": repr(exc)})

    def verify(self, item: VerifyItem) -> Verdict:
        reference = load_reference(item.reference)
        suite = _test_suite(reference) if isinstance(reference, dict) else None
        cases = _cases(reference) if isinstance(reference, dict) and suite is None else None
        if suite is None and cases is None:
            return Verdict(INFRA_ERROR, "bad_reference", {"isolation": self._isolation()})
        code = extract_program(item.answer) or extract_program(item.completion)
        if code is None:
            return Verdict(FAILED, "no_code", {"isolation": self._isolation()})
        return self._run_suite(code, *suite) if suite is not None else self._run_cases(code, cases)

    def _isolation(self) -> str:
        return available_isolation(self.cfg)

    def _run_suite(self, code: str, tests: str, entry_point: str, prompt: str) -> Verdict:
        if prompt and not _defines(code, entry_point):  # a completion holding only the function body
            code = prompt + ("" if prompt.endswith("\n") else "\n") + code
        token = f"distill-suite-passed-{secrets.token_hex(16)}"
        harness = f"\n\ncheck({entry_point})\nimport os as _distill_os\n_distill_os.write(1, b'\\n{token}\\n')\n"
        result = run_python(code + "\n\n" + tests + harness, cfg=self.cfg)
        failure = _failure(result)
        if failure is not None:
            return failure
        if token not in result.stdout:
            detail = {"isolation": result.isolation, "stderr": "the program exited before its tests ran"}
            return Verdict(FAILED, "runtime_error", detail)
        return Verdict(PASSED, "correct", {"isolation": result.isolation})

    def _run_cases(self, code: str, cases: list[tuple[str, str]]) -> Verdict:
        isolation = self._isolation()
        for index, (stdin, expected) in enumerate(cases):
            result = run_python(code, stdin, cfg=self.cfg)
            isolation = result.isolation
            failure = _failure(result)
            if failure is not None:
                failure.detail["case"] = index
                return failure
            if normalize_output(result.stdout) != normalize_output(expected):
                excerpts = {"expected": expected[:_EXCERPT_CHARS], "got": result.stdout[:_EXCERPT_CHARS]}
                return Verdict(FAILED, "wrong_output", {"isolation": isolation, "case": index, **excerpts})
        return Verdict(PASSED, "correct", {"isolation": isolation, "cases": len(cases)})
