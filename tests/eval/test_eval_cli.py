"""`distill eval` end to end on the embedded model through the real vLLM engine and verifiers; each model in a process
of its own."""

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from eval.benchmarks import Benchmark
from eval.evaluate import _collect
from eval.metrics import ModelRun, Sample
from pipeline.models import EMBEDDED_ALIAS
from pipeline.parts import PartWriter
from pipeline.records import VERIFIED_SCHEMA
from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def distill_eval(output, *args, timeout=900):
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", "--model", f"teacher={EMBEDDED_ALIAS}", "-q"]
    cmd += ["--benchmarks", "gym:chain_sum", "--limit", "5", "--samples", "3", "--max-tokens", "40"]
    cmd += ["--output", str(output), *args]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "report.json").read_text())


def completions(output, label="teacher"):
    (run_dir,) = (output / "generations").glob(f"{label}-*")
    rows = ds.dataset(run_dir / "raw").to_table(columns=["problem_id", "sample_index", "completion"]).to_pylist()
    return {(r["problem_id"], r["sample_index"]): r["completion"] for r in rows}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Evaluations with seed 0 in separate folders (nothing shared), and one with seed 1. Evaluation b has three
    models: the teacher, the same model again under another label (it used to run second in the process, after the
    first engine), and a 2-layer student pruned from it."""
    from sft.prune import prune_layers

    root = tmp_path_factory.mktemp("eval")
    student = prune_layers(EMBEDDED_ALIAS, 2, root / "student")
    three = ["--model", f"twin={EMBEDDED_ALIAS}", "--model", f"student={student}"]
    reports = {name: distill_eval(root / name, "--seed", "0", *extra) for name, extra in (("a", []), ("b", three))}
    reports["c"] = distill_eval(root / "c", "--seed", "1")
    return root, reports


@pytest.mark.slow
def test_the_same_model_and_seed_give_the_same_samples_and_pass_at_1(seeded):
    root, reports = seeded
    cs = "gym-chain_sum"
    assert reports["b"]["results"][cs]["teacher"] == reports["a"]["results"][cs]["teacher"]
    first = completions(root / "a")
    assert len(first) == 15 and first == completions(root / "b")
    # The second model of an evaluation answers as it would alone (it used to share the first one's process).
    assert completions(root / "b", "twin") == first
    twin = dict(reports["b"]["results"][cs]["twin"], retention=None)
    assert twin == dict(reports["a"]["results"][cs]["teacher"], retention=None)
    assert completions(root / "b", "student") != first  # its own model, not a copy of the teacher's answers
    # The seed is what fixes them: another seed samples other completions at temperature 0.6.
    assert completions(root / "c") != first


@pytest.mark.slow
def test_each_model_is_evaluated_in_a_process_of_its_own(seeded):
    _, reports = seeded
    workers = reports["b"]["workers"]
    pids = {label: w["pid"] for label, w in workers["models"].items()}
    assert list(pids) == ["teacher", "twin", "student"]
    assert len(set(pids.values())) == 3 and workers["parent_pid"] not in pids.values()
    assert {w["exitcode"] for w in workers["models"].values()} == {0}
    assert reports["b"]["performance"]["student"]["parameters"] < reports["b"]["performance"]["teacher"]["parameters"]


@pytest.mark.slow
def test_the_report_holds_accuracy_performance_and_png_plots(seeded):
    root, reports = seeded
    report = reports["a"]
    scores = report["results"]["gym-chain_sum"]["teacher"]
    assert scores["problems"] == 5 and scores["samples"] == 15
    assert 0 <= scores["pass@1"] <= 1 and scores["cons@k"] is not None
    perf = report["performance"]["teacher"]
    assert perf["tokens_per_s"] > 0 and perf["latency_p95_s"] >= perf["latency_p50_s"] > 0
    assert perf["parameters"] == 134_515_008  # SmolLM2-135M with tied embeddings, counted from the headers
    assert perf["peak_memory_bytes"] > 100 * 2**20 and perf["size_on_disk_bytes"] > 500 * 2**20
    assert 0 < perf["avg_completion_tokens"] <= 40
    for plot in ("accuracy.png", "performance.png"):
        assert (root / "a" / "plots" / plot).read_bytes().startswith(PNG_MAGIC)
    assert "| gym-chain_sum | teacher |" in (root / "a" / "report.md").read_text()


@pytest.mark.slow
def test_a_repeated_evaluation_reuses_its_answers_and_keeps_its_measurements(seeded):
    root, reports = seeded
    again = distill_eval(root / "a", "--seed", "0", timeout=300)
    assert again["results"] == reports["a"]["results"]
    assert again["performance"]["teacher"]["tokens_per_s"] == reports["a"]["performance"]["teacher"]["tokens_per_s"]
    (run_dir,) = (root / "a" / "generations").iterdir()
    stats = json.loads((run_dir / "stats.json").read_text())["generate"]
    assert stats["problems_answered"] == 0 and stats["problems_resumed"] == 5


def test_collect_keeps_every_frozen_problem_and_counts_the_unanswered(tmp_path):
    """A problem without rows, and one whose only sample is an infrastructure error, stay in as unanswered."""
    frozen = tmp_path / "b.jsonl"
    frozen.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": "?"}) + "\n" for i in range(3)))
    run = ModelRun("m", "m", "rev", tmp_path / "run")

    def row(pid, status):
        detail = json.dumps({"extracted": "1"})
        return {"problem_id": pid, "sample_index": 0, "domain": "math", "status": status, "verdict_detail": detail}

    with PartWriter(run.run_dir / "verified", 10, 3600, schema=VERIFIED_SCHEMA) as writer:
        writer.add([row("p0", "passed"), row("p1", "infra_error")])
    _collect(run, [Benchmark("b", frozen, 3, 0)])
    assert run.samples == {"b": {"p0": [Sample(True, "1")], "p1": [], "p2": []}}
    assert run.unanswered == 2 and run.unscored == 1 and run.domains == {"b": "math"}


def test_collect_sets_aside_a_problem_whose_reference_is_a_data_fault(tmp_path):
    """A data fault is the reference's, not the model's: the problem leaves the scoring, not counted as failed."""
    frozen = tmp_path / "b.jsonl"
    frozen.write_text("".join(json.dumps({"id": f"p{i}", "domain": "math", "prompt": "?"}) + "\n" for i in range(2)))
    run = ModelRun("m", "m", "rev", tmp_path / "run")
    rows = [
        {"problem_id": pid, "sample_index": 0, "domain": "math", "status": status, "verdict_detail": "{}"}
        for pid, status in (("p0", "failed"), ("p1", "data_fault"))
    ]
    with PartWriter(run.run_dir / "verified", 10, 3600, schema=VERIFIED_SCHEMA) as writer:
        writer.add(rows)
    _collect(run, [Benchmark("b", frozen, 2, 0)])
    assert run.samples == {"b": {"p0": [Sample(False, None)]}}
    assert run.data_faults == {"p1"} and run.unanswered == 0 and run.unscored == 0
