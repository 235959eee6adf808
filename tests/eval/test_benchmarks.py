"""Benchmarks are frozen to one JSONL per benchmark that every model answers; training prompts are left out."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.benchmarks import freeze, resolve
from eval.config import EVAL_GYM_SEED, EvalConfig
from pipeline.generate.config import GymSource, HumanEvalSource
from pipeline.generate.sources import load_problems


def make_dataset(folder, train_prompts, test_rows, test_problems=None):
    """A folder in the `distill build` layout (only the columns eval reads); `test_problems` defaults to the
    distinct problems of `test_rows`."""
    (folder / "data").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    train = pa.table({"prompt": train_prompts})
    pq.write_table(train, folder / "data" / "train-00000-of-00001.parquet")
    test = pa.Table.from_pylist(test_rows)
    pq.write_table(test, folder / "data" / "test-00000-of-00001.parquet")
    if test_problems is None:
        test_problems = list({r["problem_id"]: r for r in test_rows}.values())
    keys = ("problem_id", "source", "domain", "prompt", "reference")
    records = [{k: p.get(k, "") for k in keys} | {"metadata": "{}"} for p in test_problems]
    pq.write_table(pa.Table.from_pylist(records), folder / "test_problems.parquet")
    return folder


def config(tmp_path, benchmarks, **fields):
    return EvalConfig(models=["m"], benchmarks=benchmarks, output=str(tmp_path / "out"), **fields)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_builtin_names_resolve_to_generate_sources(tmp_path):
    cfg = config(tmp_path, ["gym:chain_sum"], limit=7)
    name, source = resolve("gym:chain_sum", cfg)
    assert name == "gym-chain_sum"
    assert source == GymSource(tasks=["chain_sum"], size=7, seed=EVAL_GYM_SEED, name="gym")
    assert resolve("humaneval", cfg) == ("humaneval", HumanEvalSource(limit=7))
    with pytest.raises(FileNotFoundError, match="not humaneval, gym:TASK"):
        resolve(str(tmp_path / "nowhere"), cfg)


def test_gym_benchmark_seed_gives_problems_other_than_the_training_seed(tmp_path):
    cfg = config(tmp_path, ["gym:basic_arithmetic"], limit=20)
    benchmarks, _ = freeze(cfg, tmp_path / "bench")
    eval_prompts = {p["prompt"] for p in read(benchmarks[0].path)}
    train, _ = load_problems([GymSource(tasks=["basic_arithmetic"], size=20, seed=0)], tmp_path)
    assert len(eval_prompts) == 20
    assert eval_prompts != {p.prompt for p in train}


def test_a_dataset_folder_gives_all_its_test_problems_once_each_the_unsolved_ones_included(tmp_path):
    rows = [
        {"problem_id": "p1", "source": "s", "domain": "math", "prompt": "1+1?", "reference": "2"},
        {"problem_id": "p1", "source": "s", "domain": "math", "prompt": "1+1?", "reference": "2"},  # 2nd sample
    ]
    # p2 is a test problem the teacher never solved: no row of the test split, but a problem to evaluate.
    unsolved = {"problem_id": "p2", "source": "s", "domain": "math", "prompt": "2+2?", "reference": "4"}
    dataset = make_dataset(tmp_path / "run" / "dataset", ["9+9?"], rows, [rows[0], unsolved])
    benchmarks, rejects = freeze(config(tmp_path, [str(dataset)]), tmp_path / "bench")
    assert benchmarks[0].name == "run-test"
    assert [(p["id"], p["prompt"], p["domain"]) for p in read(benchmarks[0].path)] == [
        ("p1", "1+1?", "math"),
        ("p2", "2+2?", "math"),
    ]
    assert rejects == []


def test_a_dataset_built_without_its_test_problems_is_refused_rather_than_read_from_solved_rows(tmp_path):
    dataset = make_dataset(tmp_path / "ds", ["a"], [{"problem_id": "x", "prompt": "y"}])
    (dataset / "test_problems.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="rebuild it"):
        freeze(config(tmp_path, [str(dataset)]), tmp_path / "bench")


def test_a_dataset_without_a_test_split_is_a_clear_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", ["a"], [{"problem_id": "x", "prompt": "y"}])
    (dataset / "data" / "test-00000-of-00001.parquet").unlink()
    (dataset / "test_problems.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no test split"):
        freeze(config(tmp_path, [str(dataset)]), tmp_path / "bench")


def test_training_prompts_are_removed_from_benchmarks_and_counted(tmp_path):
    problems = tmp_path / "problems.jsonl"
    lines = [{"prompt": "What is 2 + 2?", "reference": "4"}, {"prompt": "What is 3 + 5?", "reference": "8"}]
    lines.append({"prompt": 7, "reference": "bad row"})
    problems.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # Same prompt up to case and spacing: still a training prompt.
    dataset = make_dataset(tmp_path / "ds", ["what is  2 + 2?"], [{"problem_id": "x", "prompt": "y"}])
    cfg = config(tmp_path, [str(problems)], exclude_prompts_from=[str(dataset)])
    benchmarks, rejects = freeze(cfg, tmp_path / "bench")
    assert benchmarks[0].problems == 1 and benchmarks[0].excluded_as_training == 1
    assert [p["prompt"] for p in read(benchmarks[0].path)] == ["What is 3 + 5?"]
    assert len(rejects) == 1 and rejects[0].line == 3 and "not a string" in rejects[0].reason


def test_a_benchmark_made_only_of_training_prompts_is_refused(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"prompt": "same", "reference": "1"}) + "\n")
    dataset = make_dataset(tmp_path / "ds", ["same"], [{"problem_id": "x", "prompt": "y"}])
    with pytest.raises(ValueError, match="no problems left"):
        freeze(config(tmp_path, [str(problems)], exclude_prompts_from=[str(dataset)]), tmp_path / "bench")


def test_models_need_distinct_labels():
    with pytest.raises(ValueError, match="share the label student"):
        EvalConfig(models=["a/student", "b/student"], benchmarks=["humaneval"])
    EvalConfig(models=["before=a/student", "after=b/student"], benchmarks=["humaneval"])
