"""The report: retention, speed-up and memory reduction against the first model; tables and PNG plots written."""

import json

import pytest

from eval.benchmarks import Benchmark
from eval.config import EvalConfig
from eval.metrics import ModelRun, Sample
from eval.report import build_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def model_run(label, verdicts_by_benchmark, tokens_per_s, size, domain="gym"):
    run = ModelRun(label, f"models/{label}", "rev", None)
    for benchmark, problems in verdicts_by_benchmark.items():
        run.samples[benchmark] = {
            f"p{i}": [Sample(v, str(v)) for v in verdicts] for i, verdicts in enumerate(problems)
        }
        run.domains[benchmark] = domain
    run.performance = {"tokens_per_s": tokens_per_s, "size_on_disk_bytes": size, "parameters": size // 4}
    return run


@pytest.fixture
def report(tmp_path):
    benchmarks = [Benchmark("a", tmp_path / "a.jsonl", 2, 0), Benchmark("b", tmp_path / "b.jsonl", 2, 1)]
    teacher = model_run("teacher", {"a": [[True, True], [True, False]], "b": [[True, True], [False, False]]}, 50, 400)
    student = model_run(
        "student", {"a": [[True, False], [False, False]], "b": [[True, True], [False, False]]}, 100, 100
    )
    cfg = EvalConfig(models=["teacher=x", "student=y"], benchmarks=["humaneval"], samples=2)
    return build_report(cfg, benchmarks, [teacher, student], {"gym"})


def test_retention_speedup_and_memory_reduction_are_relative_to_the_first_model(report):
    a, b, pooled = report["results"]["a"], report["results"]["b"], report["results"]["all"]
    assert a["teacher"]["pass@1"] == pytest.approx(0.75) and a["student"]["pass@1"] == pytest.approx(0.25)
    assert a["student"]["retention"] == pytest.approx(0.25 / 0.75)
    assert b["student"]["retention"] == pytest.approx(1.0)
    # Pooled over the four problems: teacher (1 + .5 + 1 + 0) / 4, student (.5 + 0 + 1 + 0) / 4.
    assert pooled["teacher"]["pass@1"] == pytest.approx(0.625)
    assert report["headline"]["student"]["accuracy_retention"] == pytest.approx(0.375 / 0.625)
    assert report["headline"]["student"]["speedup"] == pytest.approx(2.0)
    assert report["headline"]["student"]["memory_reduction"] == pytest.approx(0.75)
    assert report["performance"]["teacher"]["speedup"] == pytest.approx(1.0)
    assert "teacher" not in report["headline"]


def test_report_files_are_strict_json_markdown_and_png(tmp_path, report):
    report["results"]["a"]["student"]["pass@1_stderr"] = None  # e.g. one problem: no standard error
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail) == report
    text = (tmp_path / "report.md").read_text()
    assert "| a | student | 25.0% | 50.0% ± 50.0 |" in text  # no standard error printed when there is none
    assert "| b | teacher | 50.0% ± 50.0 |" in text
    assert "| student | 60.0% | 2.00x | 75.0% |" in text  # the headline row
    for name in ("accuracy.png", "performance.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(plots/{name})" in text


def test_cons_at_k_is_not_reported_for_code(tmp_path):
    benchmarks = [Benchmark("humaneval", tmp_path / "h.jsonl", 1, 0)]
    run = model_run("m", {"humaneval": [[True, False]]}, 10, 8, domain="code")
    report = build_report(EvalConfig(models=["m"], benchmarks=["humaneval"]), benchmarks, [run], {"gym"})
    assert report["results"]["humaneval"]["m"]["cons@k"] is None
    assert report["results"]["humaneval"]["m"]["pass@1"] == pytest.approx(0.5)
    assert "all" not in report["results"] and report["headline"] == {}


def test_every_model_is_scored_on_the_same_problems_and_unanswered_ones_count_as_failed(tmp_path):
    # Four problems; the student answered only three (the fourth was too long for it, or failed).
    benchmarks = [Benchmark("a", tmp_path / "a.jsonl", 4, 0)]
    teacher = model_run("teacher", {"a": [[True, True], [True, False], [False, False], [True, True]]}, 50, 400)
    student = model_run("student", {"a": [[True, True], [True, False], [False, False]]}, 100, 100)
    student.samples["a"]["p3"] = []  # no answer: what the collector records for an unanswered problem
    cfg = EvalConfig(models=["teacher=x", "student=y"], benchmarks=["humaneval"], samples=2)
    report = build_report(cfg, benchmarks, [teacher, student], {"gym"})
    scores = report["results"]["a"]
    # pass@1 over 4 problems, not 3: student (1 + .5 + 0 + 0) / 4, teacher (1 + .5 + 0 + 1) / 4.
    assert scores["student"]["pass@1"] == pytest.approx(0.375)
    assert scores["teacher"]["pass@1"] == pytest.approx(0.625)
    assert scores["student"]["retention"] == pytest.approx(0.375 / 0.625)
    assert scores["student"]["problems"] == scores["teacher"]["problems"] == 4
    assert scores["student"]["unanswered"] == 1 and scores["teacher"]["unanswered"] == 0
    # cons@k votes over the same four: the majority is right on p0 and p1 (a tie goes to "True", seen first).
    assert scores["student"]["cons@k"] == pytest.approx(2 / 4)
    # Its standard error is over the same four per-problem rates (1, .5, 0, 0): variance 0.229166 / 4.
    assert scores["student"]["pass@1_stderr"] == pytest.approx(((0.625**2 + 0.125**2 + 2 * 0.375**2) / 3 / 4) ** 0.5)


def test_a_problem_missing_from_one_models_answers_stays_in_its_denominator(tmp_path):
    # A model whose collector never saw a problem at all (no entry) is scored on the same set as the others.
    benchmarks = [Benchmark("a", tmp_path / "a.jsonl", 2, 0)]
    teacher = model_run("teacher", {"a": [[True], [True]]}, 50, 400)
    student = model_run("student", {"a": [[True]]}, 100, 100)
    cfg = EvalConfig(models=["teacher=x", "student=y"], benchmarks=["humaneval"], samples=1)
    scores = build_report(cfg, benchmarks, [teacher, student], {"gym"})["results"]["a"]
    assert scores["student"]["pass@1"] == pytest.approx(0.5) and scores["student"]["problems"] == 2
    assert scores["student"]["unanswered"] == 1


def test_a_problem_with_an_unreadable_reference_is_scored_for_no_model(tmp_path):
    # p2's reference is a data fault: the teacher's verify saw it; the student never answered p2 at all. Neither
    # model is scored on it: both pass@1 are over p0 and p1 only, and the fault is reported.
    benchmarks = [Benchmark("a", tmp_path / "a.jsonl", 3, 0)]
    teacher = model_run("teacher", {"a": [[True, True], [True, False]]}, 50, 400)
    teacher.data_faults = {"p2"}
    student = model_run("student", {"a": [[True, False], [False, False]]}, 100, 100)
    student.samples["a"]["p2"] = []
    cfg = EvalConfig(models=["teacher=x", "student=y"], benchmarks=["humaneval"], samples=2)
    report = build_report(cfg, benchmarks, [teacher, student], {"gym"})
    scores = report["results"]["a"]
    assert scores["teacher"]["pass@1"] == pytest.approx((1 + 0.5) / 2)
    assert scores["student"]["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert scores["teacher"]["problems"] == scores["student"]["problems"] == 2
    assert scores["student"]["unanswered"] == 0
    assert report["incomplete"]["teacher"]["data_faults"] == 1
