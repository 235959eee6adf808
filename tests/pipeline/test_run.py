"""`distill run`: stages in order, skipped when complete with unchanged inputs, SFT resumed after an interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.config import RecipeError
from pipeline.models import EMBEDDED_ALIAS
from pipeline.run import _stage_hashes, load_run_recipe
from tests.conftest import ROOT, sigint_as_in_a_terminal

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def tiny_recipe(tmp_path, **changes) -> dict:
    """Every stage at toy size: 16 one-digit sums, a 2-layer student, 40 SFT steps, 6 eval problems."""
    recipe = {
        "name": "tiny",
        "sources": [{"type": "reasoning_gym", "tasks": ["chain_sum"], "size": 16, "seed": 0, "config": EASY}],
        "sampling": {"n": 4, "max_tokens": 32, "seed": 0, "logprobs": 5},
        "teacher": {"model": EMBEDDED_ALIAS, "max_model_len": 512, "max_num_seqs": 32},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "verify": {"filters": {"enabled": ["truncated"]}},
        "build": {"near_dup_threshold": None},
        "student": {"layers": 2},
        "sft": {
            "max_steps": 40,
            "save_steps": 4,
            "save_strategy": "steps",
            "per_device_train_batch_size": 2,
            "learning_rate": 1.0e-4,
            "max_length": 256,
            "logging_steps": 1,
            "report_to": "none",
        },
        "eval": {
            "benchmarks": [
                {"type": "reasoning_gym", "name": "cs", "tasks": ["chain_sum"], "size": 6, "seed": 7, "config": EASY}
            ],
            "samples": 2,
        },
    }
    recipe.update(changes)
    return recipe


def write(tmp_path, recipe) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_changed_section_reruns_its_stage_and_the_stages_after_it(tmp_path):
    base = _stage_hashes(load_run_recipe(write(tmp_path, tiny_recipe(tmp_path))))
    sft = dict(tiny_recipe(tmp_path)["sft"], learning_rate=2.0e-4)
    changed = _stage_hashes(load_run_recipe(write(tmp_path, tiny_recipe(tmp_path, sft=sft))))
    assert [s for s in base if base[s] != changed[s]] == ["sft", "eval"]
    served = load_run_recipe(write(tmp_path, tiny_recipe(tmp_path)), ["teacher.max_num_seqs=8"])
    assert [s for s, h in _stage_hashes(served).items() if h != base[s]] == ["eval"]  # eval uses the engine settings
    resampled = load_run_recipe(write(tmp_path, tiny_recipe(tmp_path)), ["sampling.temperature=0.7"])
    assert [s for s, h in _stage_hashes(resampled).items() if h != base[s]] == [
        "generate",
        "verify",
        "build",
        "sft",
        "eval",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sft": {"learnig_rate": 1}}, "unknown sft field.*learnig_rate"),
        ({"eval": {"benchmarks": ["humaneval"], "sampels": 2}}, "eval.sampels"),
        ({"eval": {"benchmarks": [{"type": "reasoning_gym", "tasks": ["chain_sum"], "seed": 0}]}}, "training seed"),
        ({"student": {"layers": 0}}, "student.layers"),
    ],
)
def test_recipe_mistakes_fail_before_any_stage_runs(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        load_run_recipe(write(tmp_path, tiny_recipe(tmp_path, **change)))


@pytest.fixture
def launched():
    """Processes a test starts; any still running when it ends (a failed assertion) are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def distill_run(launched, config, *args):
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", config, "-q", *args]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    launched.append(process)
    return process


def wait_for(condition, process, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"distill run ended early:\n{process.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def raw_parts(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "raw").glob("part-*.parquet")}


@pytest.mark.slow
def test_an_interrupted_sft_resumes_from_its_checkpoint_without_regenerating(tmp_path, launched):
    config = write(tmp_path, tiny_recipe(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    student = run_dir / "student"
    first = distill_run(launched, config)
    wait_for(lambda: (student / "checkpoint-4" / "trainer_state.json").exists(), first, timeout_s=900)
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, out[-3000:]
    assert json.loads((run_dir / "stages" / "sft.json").read_text())["status"] == "running"
    parts_before = raw_parts(run_dir)
    assert parts_before

    second = distill_run(launched, config)
    out = second.communicate(timeout=1500)[0]
    assert second.returncode == 0, out[-4000:]
    log = (run_dir / "run.log").read_text()
    for stage in ("generate", "verify", "build", "student"):
        assert f"[{stage}] skipped: complete and inputs unchanged" in log.split("[run] recipe tiny")[-1]
    assert "[sft] interrupted after" in log and "[sft] resuming" in log
    resumed_from = [line for line in out.splitlines() if "distill sft: resuming from" in line]
    assert resumed_from and "checkpoint-" in resumed_from[0], out[-3000:]
    assert int(resumed_from[0].rsplit("checkpoint-", 1)[1]) >= 4
    assert raw_parts(run_dir) == parts_before  # no completion was generated again
    state = json.loads((student / "trainer_state.json").read_text())
    assert state["global_step"] == 40

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher", "student-before", "student-after"]
    assert set(report["results"]["cs"]) == {"teacher", "student-before", "student-after"}
    assert report["headline"]["student-after"]["speedup"] > 1  # 2 of 30 layers generate faster
    train = ds.dataset(sorted((run_dir / "dataset" / "data").glob("train-*.parquet"))).to_table(columns=["prompt"])
    frozen = [
        json.loads(x)["prompt"] for x in (run_dir / "eval" / "benchmarks" / "cs.jsonl").read_text().split("\n") if x
    ]
    assert not set(frozen) & set(train["prompt"].to_pylist())  # no training prompt is evaluated

    # Run again: every stage is skipped and nothing changes.
    third = distill_run(launched, config)
    out = third.communicate(timeout=300)[0]
    assert third.returncode == 0, out[-3000:]
    last = (run_dir / "run.log").read_text().split("[run] recipe tiny")[-1]
    assert last.count("skipped: complete and inputs unchanged") == 6
