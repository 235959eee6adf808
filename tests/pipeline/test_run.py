"""`distill run`: stages in order, skipped when complete with unchanged inputs, SFT resumed after an interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.config import load_recipe
from pipeline.config_base import RecipeError
from pipeline.models import EMBEDDED_ALIAS
from pipeline.parts import PartWriter
from pipeline.run import _stage_hashes, load_run_recipe, run
from tests.conftest import ROOT, sigint_as_in_a_terminal

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
# The demo's short answer form: the embedded teacher then ends about one sample in ten with a correct "Answer: X"
# line, so 32 problems x 4 samples leave rows to train on whatever the machine's floating point (with the long form,
# 16 x 4 once left none on CI).
BRIEF = {"templates": {"gym": "brief.txt"}, "system_prompt": load_recipe(ROOT / "recipes" / "demo.yaml").system_prompt}


def tiny_recipe(tmp_path, **changes) -> dict:
    """Every stage at toy size: 32 one-digit sums, a 2-layer student, 40 SFT steps, 6 eval problems."""
    recipe = {
        "name": "tiny",
        "sources": [{"type": "reasoning_gym", "tasks": ["chain_sum"], "size": 32, "seed": 0, "config": EASY}],
        **BRIEF,
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


def sft_processes(run_dir) -> list[int]:
    """The SFT processes `distill run` started, as its log names them."""
    lines = [x for x in (run_dir / "run.log").read_text().splitlines() if "[sft] training in process " in x]
    return [int(x.split("[sft] training in process ")[1].split(":")[0]) for x in lines]


def raw_parts(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "raw").glob("part-*.parquet")}


@pytest.mark.slow
def test_an_interrupted_sft_resumes_from_its_checkpoint_without_regenerating(tmp_path, launched):
    config = write(tmp_path, tiny_recipe(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    student = run_dir / "student"
    first = distill_run(launched, config)
    wait_for(lambda: (student / "checkpoint-4" / "trainer_state.json").exists(), first, timeout_s=900)
    (trainer,) = sft_processes(run_dir)
    assert trainer != first.pid  # SFT trains in a process of its own
    first.send_signal(signal.SIGINT)  # to `distill run` alone: it must stop its SFT process
    out = first.communicate(timeout=200)[0]
    assert first.returncode == 130, out[-3000:]
    assert not psutil.pid_exists(trainer) or psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE
    assert "distill sft: interrupted" in out  # the child got the interrupt and stopped as it does in a terminal
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
    _, resumed = sft_processes(run_dir)
    assert resumed not in (trainer, second.pid) and f"[sft] process {resumed} exited with code 0" in log
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


# ---- the generate stage's inputs: a change runs in a new folder, the old one kept


def _served_recipe(tmp_path, url, **changes) -> dict:
    """Generate -> verify -> build only, on two file problems answered by a scripted OpenAI-compatible server."""
    recipe = {
        "name": "served",
        "sources": [{"type": "file", "path": str(tmp_path / "problems.jsonl")}],
        "sampling": {"n": 2, "max_tokens": 16},
        "teacher": {"backend": "openai", "model": "m", "endpoints": [url]},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "verify": {"filters": {"enabled": []}},
        "build": {"near_dup_threshold": None},
    }
    recipe.update(changes)
    return recipe


def _write_problems(tmp_path, first_prompt: str) -> None:
    rows = [{"id": "q1", "prompt": first_prompt, "reference": "4"}, {"id": "q2", "prompt": "1+3?", "reference": "4"}]
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _folder_state(run_dir):
    files = [*(run_dir / "raw").glob("part-*.parquet"), run_dir / "stages" / "generate.json", run_dir / "run.json"]
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_changed_generate_inputs_run_in_a_new_folder_and_the_old_one_is_kept(tmp_path, monkeypatch):
    from pipeline.run import run
    from tests.fake_openai import FakeOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    _write_problems(tmp_path, "2+2?")
    runs = tmp_path / "runs"
    with FakeOpenAIServer() as server:
        first = write(tmp_path, _served_recipe(tmp_path, server.url))
        assert run(load_run_recipe(first), quiet=True) == 0
        original = runs / "served"
        kept = _folder_state(original)
        assert server.chat_calls == 2 and (original / "dataset" / "manifest.json").exists()

        # Another sampling: the rows of the first run answer other settings, so the run goes elsewhere, whole.
        assert run(load_run_recipe(first, ["sampling.temperature=0.7"]), quiet=True) == 0
        (resampled,) = set(runs.iterdir()) - {original}
        assert resampled.name.startswith("served-") and server.chat_calls == 4
        assert (resampled / "dataset" / "manifest.json").exists()
        rows = ds.dataset(resampled / "raw").to_table(columns=["sampling"]).to_pylist()
        assert {json.loads(r["sampling"])["temperature"] for r in rows} == {0.7}
        assert _folder_state(original) == kept  # the old folder is untouched
        assert "is kept as it is" in (resampled / "run.log").read_text()

        # An edited row that keeps its id is another problem: not answered with the old rows.
        _write_problems(tmp_path, "2+2=?")
        assert run(load_run_recipe(first), quiet=True) == 0
        (edited,) = set(runs.iterdir()) - {original, resampled}
        prompts = ds.dataset(edited / "raw").to_table(columns=["problem_id", "prompt"]).to_pylist()
        assert {(r["problem_id"], r["prompt"]) for r in prompts} == {("q1", "2+2=?"), ("q2", "1+3?")}
        assert _folder_state(original) == kept and server.chat_calls == 6

        # The same recipe again: its folder is found, every stage skipped, no teacher call.
        assert run(load_run_recipe(first), quiet=True) == 0
        assert server.chat_calls == 6 and set(runs.iterdir()) == {original, resampled, edited}
        assert (edited / "run.log").read_text().split("[run] recipe")[-1].count("skipped: complete") == 3


def test_a_retrained_teacher_in_the_same_folder_changes_the_generate_stage(tmp_path):
    from tests.pipeline.test_models import _save

    teacher = tmp_path / "teacher"
    _save(teacher, seed=0)
    recipe = tiny_recipe(tmp_path, teacher={"model": str(teacher)})
    before = _stage_hashes(load_run_recipe(write(tmp_path, recipe)))
    _save(teacher, seed=1)
    after = _stage_hashes(load_run_recipe(write(tmp_path, recipe)))
    assert before["generate"] != after["generate"]


def _answered(pid: str, prompt: str, reference: str, i: int) -> dict:
    """A raw row as the generate stage writes it: the teacher's answer to one math problem."""
    completion = f"<think>\nSix times seven is forty-two, sample {i}.\n</think>\n\n\\boxed{{42}}"
    return {
        "problem_id": pid,
        "sample_index": i,
        "source": "math",
        "domain": "math",
        "prompt": prompt,
        "reference": reference,
        "metadata": "{}",
        "messages": json.dumps([{"role": "user", "content": prompt}]),
        "completion": completion,
        "reasoning": f"Six times seven is forty-two, sample {i}.",
        "answer": "\\boxed{42}",
        "finish_reason": "stop",
        "prompt_tokens": 20,
        "completion_tokens": 30,
        "teacher": EMBEDDED_ALIAS,
        "sampling": "{}",
        "config_hash": "c",
    }


def test_a_reference_no_verifier_can_read_is_reported_and_never_stops_or_redoes_a_run(tmp_path):
    # Problem "blank" has no gold answer (null in its file): a data fault. Every problem is already answered in
    # raw/, so generate calls no teacher; each command must finish with exit 0, say so, and verify nothing again.
    problems = [("six", "What is 6 times 7?", "42"), ("blank", "What is 7 times 6?", None)]
    (tmp_path / "math.jsonl").write_text(
        "".join(json.dumps({"id": pid, "prompt": q, "reference": ref}) + "\n" for pid, q, ref in problems)
    )
    recipe = {
        "name": "faulty",
        "sources": [{"type": "file", "path": "math.jsonl", "domain": "math"}],
        "sampling": {"n": 2, "max_tokens": 32},
        "teacher": {"model": EMBEDDED_ALIAS},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "verify": {"filters": {"enabled": []}},
        "build": {"near_dup_threshold": None},
    }
    config = write(tmp_path, recipe)
    run_dir = tmp_path / "runs" / "faulty"
    with PartWriter(run_dir / "raw", max_rows=2, max_seconds=60) as writer:
        for pid, question, reference in problems:
            writer.add([_answered(pid, question, reference or "", i) for i in range(2)])

    def distill(*args):
        env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    def verify_stats():
        return json.loads((run_dir / "stats.json").read_text())["verify"]

    generated = distill("generate", config, "-q")  # inline verify
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "2 verdict(s) are data faults (math:bad_reference x2)" in generated.stderr
    stats = verify_stats()
    assert (stats["parts_verified"], stats["passed"], stats["infra_error"], stats["data_fault"]) == (2, 2, 0, 2)
    assert stats["data_faults"] == {"math:bad_reference": 2}

    verified = distill("verify", str(run_dir), "-q")
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert (verify_stats()["parts_verified"], verify_stats()["all_parts"]["data_fault"]) == (0, 2)

    for attempt in range(2):
        ran = distill("run", "--config", config, "-q")
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert verify_stats()["parts_verified"] == 0, attempt
    card = (run_dir / "dataset" / "README.md").read_text()
    assert "| data_fault:math:bad_reference | 2 |" in card
    kept = ds.dataset(run_dir / "dataset" / "data").to_table().to_pylist()
    assert {r["problem_id"] for r in kept} == {"six"}


# ---- the SFT stage's own process: accelerate launch, a failure's error


def _sft_only(tmp_path, sft: dict, dataset: bool, **changes):
    """A run recipe whose generate, verify and build stages are recorded as done (a dataset made by the real
    `distill build` from synthetic verified rows, or none), so that `run` only starts SFT."""
    from tests.sft.conftest import build_arithmetic_dataset

    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "q", "prompt": "1+1?", "reference": "2"}) + "\n")
    recipe = {
        "name": "sft-only",
        "sources": [{"type": "file", "path": "p.jsonl"}],
        "teacher": {"model": EMBEDDED_ALIAS},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "sft": sft,
        **changes,
    }
    loaded = load_run_recipe(write(tmp_path, recipe))
    if dataset:
        build_arithmetic_dataset(loaded.run_dir, problems=8)
    hashes = _stage_hashes(loaded)
    for stage in ("generate", "verify", "build"):
        state = {"stage": stage, "hash": hashes[stage], "status": "done"}
        (loaded.run_dir / "stages").mkdir(parents=True, exist_ok=True)
        (loaded.run_dir / "stages" / f"{stage}.json").write_text(json.dumps(state))
    return loaded


@pytest.mark.slow
def test_sft_is_launched_by_accelerate_with_the_recipes_config_in_its_own_process(tmp_path):
    from pipeline.models import resolve_model
    from tests.sft.conftest import tiny_student

    student = tiny_student("qwen2", tmp_path / "init", resolve_model(EMBEDDED_ALIAS).path)
    accelerate = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "num_processes": 1,
        "num_machines": 1,
        "mixed_precision": "no",
        "use_cpu": True,
        "dynamo_backend": "NO",
    }
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(accelerate))
    sft = {
        "model_name_or_path": str(student),
        "use_peft": False,
        "dtype": "float32",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_length": 128,
        "save_strategy": "no",
        "report_to": "none",
    }
    recipe = _sft_only(tmp_path, sft, dataset=True, accelerate_config="accelerate.yaml")
    assert run(recipe, quiet=True) == 0
    log = (recipe.run_dir / "run.log").read_text()
    (trainer,) = sft_processes(recipe.run_dir)
    assert trainer != os.getpid()
    assert f"-m accelerate.commands.launch --config_file {tmp_path / 'accelerate.yaml'} -m pipeline.cli sft" in log
    assert f"[sft] process {trainer} exited with code 0" in log
    summary = json.loads((recipe.run_dir / "student" / "distill_sft.json").read_text())
    assert summary["processes"] == 1
    assert json.loads((recipe.run_dir / "stages" / "sft.json").read_text())["status"] == "done"
    # The accelerate config is an input of the stage: another one trains another student.
    trained = _stage_hashes(recipe)
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(accelerate | {"num_processes": 2}))
    changed = _stage_hashes(recipe)
    assert [stage for stage in trained if trained[stage] != changed[stage]] == ["sft", "eval"]


def test_a_failing_sft_process_stops_the_run_with_its_error(tmp_path, capfd):
    """No dataset where the run says it is: `distill sft` fails in its own process; the run stops with exit 2 (the
    `distill` command turns the StageFailed into its error line), names the child's error in run.log, and never
    marks the stage done."""
    from pipeline.run import StageFailed

    recipe = _sft_only(tmp_path, {"model_name_or_path": EMBEDDED_ALIAS, "max_steps": 1}, dataset=False)
    with pytest.raises(
        StageFailed, match=r"distill sft \(process \d+\) exited with code 2: distill sft: error: .*dataset"
    ):
        run(recipe, quiet=True)
    assert "distill sft: error:" in capfd.readouterr().err  # the child's own stderr comes through
    log = (recipe.run_dir / "run.log").read_text()
    assert "[sft] failed after" in log and "exited with code 2" in log
    assert json.loads((recipe.run_dir / "stages" / "sft.json").read_text())["status"] == "running"


def test_an_accelerate_config_that_is_not_a_file_fails_before_any_stage(tmp_path):
    with pytest.raises(RecipeError, match=r"accelerate_config .*missing\.yaml is not a file"):
        load_run_recipe(write(tmp_path, tiny_recipe(tmp_path, accelerate_config="missing.yaml")))
