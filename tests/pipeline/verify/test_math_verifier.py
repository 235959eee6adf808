"""MathVerifier: answer extraction, agreement with a fixed equivalence suite, and the pool's hard deadline.

The suite tests/data/math_equivalence.jsonl is fixed data; it was written by `build_equivalence_cases` below:
    PYTHONPATH=. .venv/bin/python tests/pipeline/verify/test_math_verifier.py
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline.records import DATA_FAULT, FAILED, INFRA_ERROR, PASSED
from pipeline.verify.config import MathConfig
from pipeline.verify.verifiers.base import VerifyItem
from pipeline.verify.verifiers.math import MathVerifier, extract_answer

SUITE = Path(__file__).resolve().parents[2] / "data" / "math_equivalence.jsonl"
TEMPLATES = (
    "Adding the pieces up, the result is $\\boxed{{{x}}}$.",
    "Let me double-check the arithmetic... yes.\n\nTherefore the answer is \\boxed{{{x}}}.",
    "My first attempt gave \\boxed{{0}}, which fails the check. Redoing it: \\boxed{{{x}}}",
    "Final answer: {x}",
    "**Answer:** ${x}$",
    "So the answer is {x}.",
)
# (gold, answer, equivalent, note): the forms the brief asks for and the near misses that must never pass.
HAND_WRITTEN = [
    ("\\frac{1}{2}", "0.5", True, "fraction vs decimal"),
    ("0.5", "\\frac{1}{2}", True, "decimal vs fraction"),
    ("1/2", "\\dfrac12", True, "brace-less \\dfrac"),
    ("\\frac{1}{2}", "\\frac{2}{4}", True, "unreduced fraction"),
    ("\\frac12", "-\\frac12", False, "wrong sign"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True, "sign inside the numerator"),
    ("\\frac{1}{3}", "0.33", False, "two-digit rounding is not 1/3"),
    ("\\frac{3}{2}", "\\frac{2}{3}", False, "swapped fraction"),
    ("-2.5", "-\\frac{5}{2}", True, "negative decimal vs fraction"),
    ("\\{1,2\\}", "\\{2,1\\}", True, "set order does not matter"),
    ("{1,2}", "\\{2, 1\\}", True, "gold set written with bare braces"),
    ("\\{1,2,3\\}", "\\{1,2\\}", False, "set missing an element"),
    ("[1,2)", "[1, 2)", True, "same half-open interval"),
    ("[1,2)", "[1,2]", False, "closed vs half-open endpoint"),
    ("(-\\infty, 2]", "(-\\infty, 2)", False, "open vs closed endpoint at 2"),
    ("(1, 2)", "(2, 1)", False, "swapped pair"),
    ("(3, -1)", "(3, 1)", False, "point with a wrong sign"),
    ("3", "x = 3", True, "assignment against a bare value"),
    ("x = 3", "3", True, "bare value against an assignment"),
    ("x = 3", "x = -3", False, "assignment with the wrong sign"),
    ("y = 2x + 1", "2x+1", True, "right-hand side of the gold equation"),
    ("5", "5 cm", True, "unit as plain text"),
    ("5", "5 \\text{ cm}", True, "unit in \\text"),
    ("5 \\text{ cm}", "5", True, "unit on the gold side"),
    ("12", "12\\text{ cm}^2", True, "squared unit"),
    ("5", "6 \\text{ cm}", False, "wrong value with a unit"),
    ("5", "\\$5", True, "currency sign"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True, "slash form of sqrt(2)/2"),
    ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}", True, "rationalised vs not"),
    ("2\\sqrt{2}", "\\sqrt{8}", True, "simplified radical"),
    ("\\sqrt{2}", "1.414", False, "three-digit approximation of sqrt(2)"),
    ("2\\pi", "6.28", False, "approximation of 2pi is not 2pi"),
    ("\\pi", "3.14", False, "approximation of pi"),
    ("2\\pi", "\\pi \\cdot 2", True, "reordered product"),
    ("1000", "1e3", True, "scientific notation"),
    ("1000", "10^3", True, "power of ten"),
    ("1000", "1e4", False, "wrong exponent"),
    ("1000", "1,000", True, "thousands separator"),
    ("1000000", "1\\,000\\,000", True, "thin-space digit groups"),
    ("1000", "1{,}000", True, "braced LaTeX comma separator"),
    ("10^{10}", "10000000000", True, "power written out"),
    ("0.5", "50\\%", True, "percentage equals the fraction"),
    ("50", "50\\%", True, "percent convention: X\\% answers a question whose gold is X (percent)"),
    ("0.5", "5\\%", False, "wrong percentage"),
    ("-3", "-3", True, "negative integer"),
    ("-3", "3", False, "dropped sign"),
    ("-7", "- 7", True, "space after the minus"),
    ("0", "-0", True, "negative zero"),
    ("1.5", "\\frac{3}{2}", True, "decimal gold, fraction answer"),
    ("7", "\\frac{14}{2}", True, "integer as a fraction"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", True, "matrix"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", False, "matrix entry"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False, "swapped vector"),
    ("x^2+2x+1", "(x+1)^2", True, "factored polynomial"),
    ("x+1", "x-1", False, "wrong sign in an expression"),
    ("10", "\\binom{5}{2}", True, "binomial coefficient"),
    ("120", "5!", True, "factorial"),
    ("3", "\\log_2 8", True, "logarithm"),
    ("30", "30^\\circ", True, "degrees"),
    ("\\infty", "\\infty", True, "infinity"),
    ("\\infty", "-\\infty", False, "negative infinity"),
    ("0.25", "25", False, "the percent number without its sign is not the fraction"),
    ("0.0000001", "0.0000002", False, "differs past math-verify's default 6 places"),
    ("1e-7", "2e-7", False, "tiny values in scientific notation"),
    ("\\text{Evelyn}", "Evelyn", True, "text answer"),
    ("x \\in [2,5]", "[2,5]", True, "membership vs the interval"),
    ("\\frac{1}{3}", "0.\\overline{3}", True, "repeating decimal (math-verify cannot parse \\overline)"),
]


def _fraction_parts(gold: str) -> tuple[int, int]:
    digits = [int(s) for s in "".join(c if c.isdigit() else " " for c in gold).split()]
    return digits[0], digits[1]


def _gym_pairs(task: str, gold: str) -> list[tuple[str, bool, str]]:
    """Equivalent spellings and near misses of one reasoning-gym answer."""
    if task in ("basic_arithmetic", "gcd", "lcm", "simple_equations"):
        n = int(gold)
        pairs = [(str(n), True, "same integer"), (str(n + 1), False, "off by one")]
        pairs.append((f"{n:,}", True, "thousands separators") if abs(n) >= 1000 else (f"{n}.0", True, "trailing .0"))
        if task == "simple_equations":
            pairs.append((f"x = {n}", True, "as an assignment"))
        return pairs + ([(str(-n), False, "wrong sign")] if n else [])
    if task == "fraction_simplification":
        p, q = _fraction_parts(gold)
        return [
            (f"\\frac{{{p}}}{{{q}}}", True, "\\frac form"),
            (f"{p}/{q}", True, "slash form"),
            (f"\\dfrac{{{2 * p}}}{{{2 * q}}}", True, "unreduced: same value (the task wants it reduced)"),
            (f"\\frac{{{q}}}{{{p}}}", False, "swapped fraction"),
            (f"{p / q:.3f}", False, "three-digit decimal approximation"),
        ]
    if task == "decimal_arithmetic":
        places = len(gold.split(".")[1])
        last = Fraction(gold) + Fraction(1, 10**places)
        return [
            (gold + "0", True, "trailing zero"),
            (f"\\frac{{{Fraction(gold).numerator}}}{{{Fraction(gold).denominator}}}", True, "as a fraction"),
            (f"{float(last):.{places}f}", False, "last digit off by one"),
            (f"{-Fraction(gold).numerator / Fraction(gold).denominator:.{places}f}", False, "wrong sign"),
        ]
    if task == "prime_factorization":
        factors = [int(f) for f in gold.split("\u00d7")]
        counts = {f: factors.count(f) for f in sorted(set(factors))}
        powered = " \\cdot ".join(f"{f}^{{{k}}}" if k > 1 else str(f) for f, k in counts.items())
        pairs = [(powered, True, "prime powers"), (" \\times ".join(map(str, reversed(factors))), True, "reversed")]
        if len(factors) > 1:
            pairs.append((" \\times ".join(map(str, factors[1:])), False, "missing a factor"))
        return [*pairs, (" \\times ".join(map(str, [*factors, 2])), False, "extra factor 2")]
    if task == "complex_arithmetic":
        z = complex(gold.replace(" ", "").replace("i", "j"))
        re_, im = int(z.real), int(z.imag)
        return [
            (f"{re_} {'-' if im < 0 else '+'} {abs(im)}i", True, "integer parts"),
            (f"{re_} {'+' if im < 0 else '-'} {abs(im)}i", False, "conjugate"),
        ]
    raise ValueError(task)


def build_equivalence_cases() -> list[dict]:
    import reasoning_gym

    rng = random.Random(1234)
    cases = [{"gold": g, "answer": a, "equivalent": e, "note": n} for g, a, e, n in HAND_WRITTEN]
    sizes = {"basic_arithmetic": 8, "fraction_simplification": 8, "decimal_arithmetic": 6, "gcd": 4, "lcm": 5}
    sizes |= {"simple_equations": 5, "prime_factorization": 6, "complex_arithmetic": 5}
    for task, size in sizes.items():
        for entry in reasoning_gym.create_dataset(task, size=size, seed=42):
            gold = entry["answer"]
            if task == "complex_arithmetic" and "i" not in gold:
                continue
            for answer, equivalent, note in _gym_pairs(task, gold):
                cases.append({"gold": gold, "answer": answer, "equivalent": equivalent, "note": f"{task}: {note}"})
    for case in cases:  # the answer travels inside a completion, as a model writes it
        case["answer"] = rng.choice(TEMPLATES).format(x=case["answer"])
    return cases


def _load_suite() -> list[dict]:
    return [json.loads(line) for line in SUITE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(MathConfig(timeout_s=5, workers=2)) as v:
        yield v


def _item(answer: str, gold: str) -> VerifyItem:
    return VerifyItem(completion=answer, answer=answer, reference=gold)


def test_extract_answer():
    assert extract_answer("so \\boxed{\\frac{1}{\\sqrt{2}}} done") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("\\boxed{1} then \\fbox{2} and finally \\boxed{\\{3, 4\\}}.") == "\\{3, 4\\}"
    assert extract_answer("\\boxed{\\boxed{7}}") == "\\boxed{7}"  # the outer box ends last; math-verify unwraps
    assert extract_answer("Answer: 3\n**Final Answer:** $\\frac{1}{2}$. Thanks") == "\\frac{1}{2}"
    assert extract_answer("So the answer is 7.5.") == "7.5"
    assert extract_answer("unbalanced \\boxed{\\frac{1}{2}") is None
    assert extract_answer("no conclusion here") is None
    matrix = "\\begin{pmatrix}1\\\\{2}\\end{pmatrix}"  # a line break \\\\ before a brace is not a literal \\{
    assert extract_answer(f"\\boxed{{{matrix}}}") == matrix
    assert extract_answer("\\boxed{} so the final answer is 4") == "4"  # an empty box is no answer


def test_extract_answer_is_linear_on_hostile_text():
    start = time.monotonic()
    for text in ("{" * 50_000 + "\\boxed{" * 50_000, "answer: x" + " " * 50_000 + "y", "\n" * 100_000, "1" * 100_000):
        extract_answer(text)
    assert time.monotonic() - start < 1.0


def test_equivalence_suite_agreement(verifier):
    cases = _load_suite()
    assert len(cases) >= 150
    verdicts = verifier.verify_batch([_item(c["answer"], c["gold"]) for c in cases])
    assert not [v for v in verdicts if v.status == INFRA_ERROR]
    wrong = [(c, v) for c, v in zip(cases, verdicts, strict=True) if v.passed != c["equivalent"]]
    false_accepts = [(c, v) for c, v in wrong if v.passed]
    print(f"{len(cases)} pairs, {len(wrong)} disagreements, {len(false_accepts)} false accepts")
    for c, v in wrong:
        print(f"  {c['note']}: gold={c['gold']!r} extracted={v.detail['extracted']!r} -> {v.reason}")
    assert not false_accepts
    assert 1 - len(wrong) / len(cases) >= 0.99


def test_verdict_reasons_and_detail(verifier):
    items = [_item("\\boxed{0.5}", "\\frac12"), _item("\\boxed{3}", "4"), _item("I give up.", "4")]
    items.append(_item("\\boxed{" + "9" * 600 + "}", "\\text{}"))
    got = [(v.status, v.reason) for v in verifier.verify_batch(items)]
    assert got[:3] == [(PASSED, "correct"), (FAILED, "wrong_answer"), (FAILED, "no_answer")]
    assert got[3] == (DATA_FAULT, "bad_reference")
    assert len(verifier.verify_batch(items[3:])[0].detail["extracted"]) == 500
    assert verifier.verify_batch([VerifyItem("\\boxed{42}", "\\boxed{42}", json.dumps("42"))])[0].passed


def test_a_gold_answer_math_verify_cannot_read_is_a_data_fault_whatever_the_answer(verifier):
    # An empty or unparseable reference is the data's fault: final (never redone), never a wrong answer.
    items = [_item("\\boxed{4}", ""), _item("I give up.", ""), _item("\\boxed{4}", "\\text{}")]
    assert [(v.status, v.reason) for v in verifier.verify_batch(items)] == [(DATA_FAULT, "bad_reference")] * 3


def test_only_the_answer_after_the_think_block_is_judged(verifier):
    # A box inside the thinking, or in a truncated trace that never closed its block, is a draft, not the answer.
    thinking = "<think>\nIs it \\boxed{42}? Let me check.\n</think>\n\nI am not sure."
    truncated = "<think>\nIs it \\boxed{42}? Let me check"
    items = [VerifyItem(thinking, "I am not sure.", "42"), VerifyItem(truncated, "", "42")]
    assert [(v.status, v.reason) for v in verifier.verify_batch(items)] == [(FAILED, "no_answer")] * 2


ADVERSARIAL = {
    "nested_100kB": "\\boxed{" + "\\frac{" * 5000 + "1}{2}" * 5000 + "}",
    "tower": "\\boxed{10^{10^{10}}}",
    "unbalanced": "\\boxed{\\frac{1}{2}",
    "factorial": "\\boxed{1000000!}",
}


def test_adversarial_answers_meet_the_deadline():
    with MathVerifier(MathConfig(timeout_s=2, workers=2)) as v:
        assert v.verify_batch([_item("\\boxed{1}", "1")])[0].passed  # workers up before the clock starts
        for name, text in ADVERSARIAL.items():
            start = time.monotonic()
            verdict = v.verify_batch([_item(text, "1")])[0]
            elapsed = time.monotonic() - start
            print(f"{name}: {verdict.reason} in {elapsed:.2f}s")
            assert verdict.status == FAILED and elapsed < 2 + 3, name
        start = time.monotonic()
        batch = [_item(t, "1") for t in ADVERSARIAL.values()] + [_item("\\boxed{\\frac{3}{6}}", "0.5")] * 3
        verdicts = v.verify_batch(batch)
        assert time.monotonic() - start < 2 * (2 + 3)  # two workers: at most two rounds of deadline + restart
        assert [x.passed for x in verdicts] == [False] * 4 + [True] * 3


def test_items_queued_behind_a_timed_out_item_are_still_judged():
    with MathVerifier(MathConfig(timeout_s=1, workers=1)) as v:
        batch = [_item(ADVERSARIAL["tower"], "1"), _item("\\boxed{4}", "4"), _item("\\boxed{5}", "4")]
        assert [x.reason for x in v.verify_batch(batch)] == ["timeout", "correct", "wrong_answer"]


def _workers() -> set:
    return {p.pid for p in multiprocessing.active_children() if p.name == "math-verifier"}


def test_worker_crash_is_an_infra_error_and_the_pool_recovers():
    others = _workers()
    with MathVerifier(MathConfig(timeout_s=60, workers=1)) as v:
        assert v.verify_batch([_item("\\boxed{2}", "2")])[0].passed
        out = []
        thread = threading.Thread(target=lambda: out.extend(v.verify_batch([_item(ADVERSARIAL["tower"], "1")])))
        thread.start()
        time.sleep(1.0)
        (worker,) = _workers() - others
        os.kill(worker, signal.SIGKILL)  # what the OOM killer would do
        thread.join(timeout=30)
        assert (out[0].status, out[0].reason) == (INFRA_ERROR, "worker_crashed")
        assert v.verify_batch([_item("\\boxed{2}", "2")])[0].passed


ORPHAN_SCRIPT = f"""
import multiprocessing, sys
from pipeline.verify.verifiers.base import VerifyItem
from pipeline.verify.verifiers.math import MathVerifier
from pipeline.verify.config import MathConfig
v = MathVerifier(MathConfig(timeout_s=600, workers=1))
v.verify_batch([VerifyItem("", "\\\\boxed{{1}}", "1")])
print(multiprocessing.active_children()[0].pid, flush=True)
v.verify_batch([VerifyItem("", {ADVERSARIAL["tower"]!r}, "1")])
"""


def test_a_worker_stuck_in_c_code_dies_with_its_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker is now inside one long big-integer power
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        time.sleep(0.1)
    alive = Path(f"/proc/{worker}").exists()
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def test_callers_alarm_and_threads_are_left_alone(verifier):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    previous_timer = signal.setitimer(signal.ITIMER_REAL, 300)  # pytest-timeout may own one; it gets it back
    try:
        assert verifier.verify_batch([_item("\\boxed{\\sqrt{4}}", "2")])[0].passed
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 250 and not fired
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *previous_timer)
    out = []
    thread = threading.Thread(target=lambda: out.extend(verifier.verify_batch([_item("\\boxed{1/4}", "0.25")])))
    thread.start()
    thread.join(timeout=60)
    assert out and out[0].passed


def test_close_and_garbage_collection_stop_the_workers():
    others = _workers()
    v = MathVerifier(MathConfig(workers=2))
    assert v.verify_batch([_item("\\boxed{1}", "1")])[0].passed
    assert len(_workers() - others) == 2
    v.close()
    v.close()
    assert _workers() == others
    v = MathVerifier(MathConfig(workers=1))
    v.verify_batch([_item("\\boxed{1}", "1")])
    del v
    gc.collect()
    assert _workers() == others


if __name__ == "__main__":
    SUITE.parent.mkdir(parents=True, exist_ok=True)
    rows = build_equivalence_cases()
    SUITE.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} pairs to {SUITE}")
