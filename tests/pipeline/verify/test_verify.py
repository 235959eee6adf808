"""The verify stage: simple verifiers on real reasoning-gym entries, file mode, and run folders re-verified only
when their settings change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import reasoning_gym

from pipeline.generate.config import GymSource
from pipeline.generate.sources import load_problems
from pipeline.parts import PartWriter
from pipeline.records import VERIFIED_SCHEMA
from pipeline.verify.config import VerifyConfig
from pipeline.verify.stage import verify_hash, verify_run
from pipeline.verify.verifiers.base import VerifyItem
from pipeline.verify.verifiers.simple import GymVerifier, McqVerifier, TextVerifier
from tests.conftest import ROOT


def _gym_reference(task: str, index: int = 0, **config) -> tuple[str, dict]:
    """The reference the generate stage writes for a problem, and the entry it was made from."""
    problems, _ = load_problems([GymSource(tasks=[task], size=index + 1, seed=11, config=config)], Path("."))
    entry = reasoning_gym.create_dataset(task, size=index + 1, seed=11, **config)[index]
    return problems[index].reference, entry


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum", "leg_counting"])
def test_gym_verifier_uses_the_tasks_own_scorer(task):
    reference, entry = _gym_reference(task)
    right = f"Let me work it out step by step.\nAnswer: {entry['answer']}"
    wrong = f"Answer: {entry['answer']}1"
    verdicts = GymVerifier().verify_batch([VerifyItem(t, t, reference) for t in (right, wrong, "no idea")])
    assert [(v.status, v.reason) for v in verdicts] == [
        ("passed", "correct"),
        ("failed", "wrong_answer"),
        ("failed", "no_answer"),
    ]


def test_gym_verifier_scores_with_the_recipes_task_config():
    # puzzle24's scorer checks the numbers against its config's range: the default (1..10) lets "1*2*3*4" make 24
    # whatever the puzzle; the recipe's min_value=5 does not.
    reference, entry = _gym_reference("puzzle24", min_value=5, max_value=10)
    # decimal_arithmetic's tolerance is one unit of its config's max_num_decimal_places: 0.1 here, 0.001 by default.
    decimal_reference, decimal_entry = _gym_reference(
        "decimal_arithmetic", min_num_decimal_places=1, max_num_decimal_places=1
    )
    close = f"{float(decimal_entry['answer']) + 0.05:.11f}"
    items = [
        VerifyItem("Answer: 1*2*3*4", "Answer: 1*2*3*4", reference),
        VerifyItem("x", f"Answer: {entry['answer']}", reference),
        VerifyItem("x", f"Answer: {close}", decimal_reference),
    ]
    verdicts = GymVerifier().verify_batch(items)
    assert [(v.status, v.reason) for v in verdicts] == [
        ("failed", "wrong_answer"),
        ("passed", "correct"),
        ("passed", "correct"),
    ]


def test_gym_verifier_reports_an_unreadable_reference_as_a_data_fault():
    reference, _ = _gym_reference("chain_sum")
    other_question = json.dumps(json.loads(reference) | {"question": "What is 1 + 1?"})
    unknown_task = json.dumps(json.loads(reference) | {"task": "no_such_task"})
    items = [VerifyItem("Answer: 3", "Answer: 3", r) for r in ("not json", other_question, unknown_task)]
    assert [(v.status, v.reason) for v in GymVerifier().verify_batch(items)] == [
        ("data_fault", "bad_reference"),
        ("data_fault", "reference_mismatch"),  # another reasoning-gym version generates another problem
        ("data_fault", "bad_reference"),
    ]


def test_only_the_answer_after_the_think_block_is_judged():
    # The answer part is empty: the think block never closed, so the "Answer:" inside it is not the answer.
    truncated = "<think>\nAnswer: B, or maybe Answer: Paris"
    reference, entry = _gym_reference("chain_sum")
    in_thinking = f"<think>\nAnswer: {entry['answer']}"
    assert McqVerifier().verify_batch([VerifyItem(truncated, "", "B")])[0].reason == "no_answer"
    assert TextVerifier().verify_batch([VerifyItem(truncated, "", "paris")])[0].reason == "no_answer"
    assert GymVerifier().verify_batch([VerifyItem(in_thinking, "", reference)])[0].reason == "no_answer"


def test_mcq_and_text_verifiers():
    mcq = McqVerifier().verify_batch(
        [
            VerifyItem("x", "A is too small and C too large.\nAnswer: (B)", "B"),
            VerifyItem("x", "Answer: C. Because", json.dumps({"answer": "B"})),
            VerifyItem("x", "I think it is B", "B"),
        ]
    )
    assert [v.status for v in mcq] == ["passed", "failed", "failed"]
    assert mcq[2].reason == "no_answer"
    text = TextVerifier().verify_batch(
        [
            VerifyItem("x", "Answer: The Eiffel Tower.", "eiffel tower"),
            VerifyItem("x", "Answer: Big Ben", "eiffel tower"),
        ]
    )
    assert [v.status for v in text] == ["passed", "failed"]


def _raw_row(pid: str, domain: str, reference: str, completion: str, sample_index: int = 0) -> dict:
    return {
        "problem_id": pid,
        "sample_index": sample_index,
        "domain": domain,
        "prompt": "What is 6 times 7?",
        "reference": reference,
        "completion": f"<think>\nI multiply six by seven.\n</think>\n\n{completion}",
        "reasoning": "I multiply six by seven.",
        "answer": completion,
        "finish_reason": "stop",
        "completion_tokens": 20,
    }


def test_verify_run_writes_verified_parts_and_redoes_them_only_when_settings_change(tmp_path):
    with PartWriter(tmp_path / "raw", max_rows=2, max_seconds=60) as writer:
        writer.add([_raw_row("m1", "math", "42", "6 times 7 is \\boxed{42}.")])
        writer.add([_raw_row("m2", "math", "42", "6 times 7 is \\boxed{41}.")])
        writer.add([_raw_row("t1", "text", "paris", "Answer: Paris")])
    cfg = VerifyConfig()
    stats = verify_run(tmp_path, cfg, quiet=True)
    assert (stats["rows"], stats["passed"], stats["failed"], stats["parts_verified"]) == (3, 2, 1, 2)
    table = pq.read_table(tmp_path / "verified")
    assert table.schema.equals(VERIFIED_SCHEMA.remove_metadata(), check_metadata=False)
    rows = {r["problem_id"]: r for r in table.to_pylist()}
    assert rows["m1"]["passed"] and not rows["m2"]["passed"] and rows["m2"]["reason"] == "wrong_answer"
    assert all(r["verify_hash"] == verify_hash(cfg) for r in rows.values())
    assert json.loads((tmp_path / "stats.json").read_text())["verify"]["rows"] == 3

    assert verify_run(tmp_path, cfg, quiet=True)["parts_verified"] == 0  # nothing changed: nothing redone
    stricter = VerifyConfig(filters={"min_completion_tokens": 50})
    stats = verify_run(tmp_path, stricter, quiet=True)
    assert stats["parts_verified"] == 2 and stats["failed_filters"] == {"length_bounds": 3}


def test_file_mode_carries_columns_through_and_rejects_bad_rows_with_line_numbers(tmp_path):
    code_ref = {"tests": "def check(f):\n    assert f(2) == 4\n", "entry_point": "double"}
    lines = [
        json.dumps({"id": "a", "domain": "math", "reference": "1/2", "completion": "So \\boxed{0.5}"}),
        json.dumps(
            {
                "id": "b",
                "domain": "code",
                "reference": code_ref,
                "completion": "```python\ndef double(x):\n    return 2 * x\n```",
            }
        ),
        "{not json",
        json.dumps({"id": "d", "domain": "math", "completion": "\\boxed{1}"}),
        json.dumps({"id": "e", "domain": "poetry", "reference": "x", "completion": "y"}),
        json.dumps(
            {"id": "f", "domain": "gym", "reference": _gym_reference("chain_sum")[0], "completion": "Answer: -1"}
        ),
    ]
    source = tmp_path / "gens.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "gens.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", "--input", str(source), "--output", str(out), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"a", "b", "f"}
    assert rows["a"]["passed"] and rows["a"]["verifier"] == "math"
    assert rows["b"]["passed"] and rows["b"]["verifier"] == "code"
    assert rows["f"]["verifier"] == "gym" and rows["f"]["status"] in {"passed", "failed"}
    rejects = [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(" ")[0]) for r in rejects] == [
        (3, "invalid"),
        (4, "missing"),
        (5, "unknown"),
    ]


def test_a_truncated_trace_scores_no_answer_with_the_filters_off(tmp_path):
    # Stored as the split of an older rule did (all answer): the completion's own tags decide, and the block never
    # closed, so its tentative box is no answer even with every filter off (as in eval).
    text = "<think>\nMaybe it is \\boxed{42}, let me check that again"
    row = _raw_row("m1", "math", "42", "") | {"completion": text, "reasoning": "", "answer": text}
    with PartWriter(tmp_path / "raw", max_rows=1, max_seconds=60) as writer:
        writer.add([row | {"finish_reason": "length"}])
    stats = verify_run(tmp_path, VerifyConfig(filters={"enabled": []}), quiet=True)
    (verified,) = pq.read_table(tmp_path / "verified").to_pylist()
    assert (stats["passed"], verified["status"], verified["reason"]) == (0, "failed", "no_answer")
    assert verified["answer"] == ""


def test_a_reference_no_verifier_can_read_is_a_final_data_fault(tmp_path, capsys):
    with PartWriter(tmp_path / "raw", max_rows=2, max_seconds=60) as writer:
        writer.add([_raw_row("m1", "math", "42", "\\boxed{42}")])
        writer.add([_raw_row("m2", "math", "", "\\boxed{42}"), _raw_row("m2", "math", "", "no idea", 1)])
        writer.add([_raw_row("q1", "mcq", "not a letter", "Answer: B")])
    stats = verify_run(tmp_path, VerifyConfig(), quiet=True)
    assert (stats["passed"], stats["failed"], stats["infra_error"], stats["data_fault"]) == (1, 0, 0, 3)
    assert stats["data_faults"] == {"math:bad_reference": 2, "mcq:bad_reference": 1}
    assert "3 verdict(s) are data faults (math:bad_reference x2, mcq:bad_reference x1)" in capsys.readouterr().err
    rows = pq.read_table(tmp_path / "verified").to_pylist()
    assert [(r["problem_id"], r["status"], r["passed"]) for r in rows if r["problem_id"] != "m1"] == [
        ("m2", "data_fault", False),
        ("m2", "data_fault", False),
        ("q1", "data_fault", False),
    ]
    again = verify_run(tmp_path, VerifyConfig(), quiet=True)  # final: never redone, still reported
    assert (again["parts_verified"], again["data_fault"], again["all_parts"]["data_fault"]) == (0, 0, 3)
    assert again["all_parts"]["data_faults"] == {"math:bad_reference": 2, "mcq:bad_reference": 1}
