"""`distill build` on synthetic verified parts: the contract, the manifest, selection with a reason for every drop,
decontamination, weighting, and determinism."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.build.config import BuildConfig
from pipeline.build.shards import check_dataset
from pipeline.build.stage import build, is_test
from pipeline.parts import PartWriter
from pipeline.records import DATASET_SCHEMA, RAW_SCHEMA, VERIFIED_SCHEMA
from tests.conftest import ROOT

EVAL_PROBLEMS = [
    "A farmer has 17 sheep and buys 5 more at the market on Tuesday. How many sheep does the farmer have now?",
    "The sum of three consecutive even integers is 78. What is the largest of the three integers?",
]


def _row(pid: str, prompt: str, i: int, passed: bool, entropy: float, answer: str = "42", **extra) -> dict:
    return {
        "problem_id": pid,
        "sample_index": i,
        "source": extra.pop("source", "synthetic"),
        "domain": "math",
        "prompt": prompt,
        "reference": "42",
        "metadata": json.dumps(extra.pop("metadata", {})),
        "messages": json.dumps([{"role": "user", "content": prompt}]),
        "completion": f"<think>\nworking {i}\n</think>\n\n\\boxed{{{answer}}}",
        "reasoning": f"working {i}",
        "answer": f"\\boxed{{{answer}}}",
        "finish_reason": "stop",
        "prompt_tokens": 30,
        "completion_tokens": 100 + 10 * i,
        "mean_token_entropy": entropy,
        "entropy_top_k": 5,
        "teacher": "t",
        "sampling": "{}",
        "config_hash": "c",
        "verifier": "math",
        "status": "passed" if passed else "failed",
        "passed": passed,
        "reason": "correct" if passed else "wrong_answer",
        "verdict_detail": json.dumps({"extracted": answer}),
        "failed_filters": [],
        **extra,
    }


def _make_run(run_dir: Path, problems: int = 60, samples: int = 4) -> int:
    rng = np.random.default_rng(0)
    with PartWriter(run_dir / "verified", max_rows=40, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        for p in range(problems):
            prompt = (
                f"Problem {p}: compute the value of {p} plus {p * 7} minus {p % 5} and report the result carefully."
            )
            writer.add(
                [
                    _row(f"p{p}", prompt, i, passed=bool(rng.random() < 0.7), entropy=float(rng.random()))
                    for i in range(samples)
                ]
            )
        for e, text in enumerate(EVAL_PROBLEMS):  # planted copy and light paraphrase of evaluation problems
            writer.add([_row(f"planted{e}", text, 0, True, 0.2), _row(f"planted{e}", text, 1, True, 0.3)])
            writer.add([_row(f"para{e}", "Quick one. " + text.replace("How many", "how many").upper(), 0, True, 0.2)])
    return problems * samples + 3 * len(EVAL_PROBLEMS)


@pytest.fixture
def built(tmp_path):
    run_dir = tmp_path / "run"
    rows_in = _make_run(run_dir)
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in EVAL_PROBLEMS))
    cfg = BuildConfig(
        max_per_problem=2, shard_mb=0.005, test_fraction=0.1, decontamination={"eval_sets": ["evals.jsonl"]}
    )
    stats = build(run_dir, cfg, base_dir=tmp_path)
    return run_dir / "dataset", stats, rows_in, cfg


def test_output_loads_with_datasets_and_pyarrow_and_matches_the_contract(built, tmp_path, monkeypatch):
    dataset_dir, stats, _, _ = built
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(dataset_dir), cache_dir=str(tmp_path / "cache"))
    assert loaded["train"].num_rows == stats["splits"]["train"] and loaded["test"].num_rows == stats["splits"]["test"]
    table = pads.dataset(dataset_dir / "data", format="parquet").to_table()
    assert table.num_rows == stats["kept"]
    assert table.schema.remove_metadata().equals(DATASET_SCHEMA)
    first = loaded["train"][0]["messages"]
    assert first[-1]["role"] == "assistant" and first[-1]["content"].startswith("<think>\n")
    assert len(list((dataset_dir / "data").glob("train-*.parquet"))) > 1, "shard_mb should have forced several shards"
    assert check_dataset(dataset_dir) == []


def test_every_dropped_row_has_a_reason_and_planted_eval_problems_are_removed(built):
    dataset_dir, stats, rows_in, _ = built
    assert stats["rows_in"] == rows_in == stats["kept"] + sum(stats["dropped"].values())
    exclusions = pq.read_table(dataset_dir.parent / "build_exclusions.parquet").to_pylist()
    assert len(exclusions) == sum(stats["dropped"].values())
    contaminated = {e["problem_id"] for e in exclusions if e["reason"] == "contaminated:evals"}
    assert contaminated == {"planted0", "planted1", "para0", "para1"}
    kept_ids = set(pads.dataset(dataset_dir / "data").to_table(columns=["problem_id"])["problem_id"].to_pylist())
    assert not kept_ids & contaminated and len(kept_ids) > 30  # unrelated problems stay
    assert stats["decontamination"]["evals"]["removed"] == 6


def test_at_most_k_per_problem_preferring_the_highest_weight_and_weights_average_one(built):
    dataset_dir, _, _, cfg = built
    rows = pads.dataset(dataset_dir / "data").to_table().to_pylist()
    per_problem: dict[str, list[dict]] = {}
    for r in rows:
        per_problem.setdefault(r["problem_id"], []).append(r)
    assert max(len(v) for v in per_problem.values()) == cfg.max_per_problem
    assert all(r["passed"] and not r["failed_filters"] for r in rows)
    assert sum(r["weight"] for r in rows) / len(rows) == pytest.approx(1.0)
    # within a problem, a kept sample has lower entropy (higher weight) than any dropped passing one
    weights = [r["weight"] for r in rows]
    raw = [1 - r["mean_token_entropy"] / math.log(5) for r in rows]
    assert np.corrcoef(weights, raw)[0, 1] == pytest.approx(1.0)


def test_same_inputs_and_seed_give_identical_shards(tmp_path):
    digests = []
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        _make_run(run_dir)
        build(run_dir, BuildConfig(shard_mb=0.005), base_dir=tmp_path)
        digests.append(
            [e["sha256"] for e in json.loads((run_dir / "dataset" / "manifest.json").read_text())["shards"]]
        )
    assert digests[0] == digests[1]


def test_stratified_mixing_follows_the_fractions(tmp_path):
    run_dir = tmp_path / "run"
    with PartWriter(run_dir / "verified", max_rows=50, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        n = 0
        for task, count in (("big", 60), ("mid", 30), ("small", 12)):
            for p in range(count):
                prompt = f"{task} problem number {p}"
                writer.add([_row(f"{task}{p}", prompt, 0, True, 0.1, metadata={"task": task})])
                n += 1
    cfg = BuildConfig(stratify={"enabled": True}, near_dup_threshold=None)
    stats = build(run_dir, cfg, base_dir=tmp_path)
    rows = pads.dataset(run_dir / "dataset" / "data").to_table(columns=["problem_id"])["problem_id"].to_pylist()
    share = {t: sum(r.startswith(t) for r in rows) / len(rows) for t in ("big", "mid", "small")}
    assert share == pytest.approx({"big": 0.7, "mid": 0.2, "small": 0.1}, abs=0.02)
    assert stats["kept"] + stats["dropped"]["stratify_cap"] == n


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_stats_check_names_a_shard_damaged_after_the_build(built, damage):
    dataset_dir = built[0]
    shard = sorted((dataset_dir / "data").glob("train-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    command = [sys.executable, "-m", "pipeline.cli", "stats", str(dataset_dir), "--check"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert shard.name in result.stderr


def test_card_front_matter_parses_and_its_plots_are_pngs(built):
    dataset_dir = built[0]
    text = (dataset_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (dataset_dir / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_verified_parts_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="distill verify"):
        build(tmp_path, BuildConfig(), base_dir=tmp_path)
    assert not os.path.exists(tmp_path / "dataset")


# ---- what the build reads: every raw part verified, under the build's verify settings


def _verified_run(run_dir: Path, part_hashes: list[str | None]) -> None:
    """One problem per part; raw/ has every part, verified/ the ones whose hash is not None."""
    raw = PartWriter(run_dir / "raw", max_rows=1, max_seconds=3600, schema=RAW_SCHEMA)
    verified = PartWriter(run_dir / "verified", max_rows=1, max_seconds=3600, schema=VERIFIED_SCHEMA)
    for p, vhash in enumerate(part_hashes):
        row = _row(f"p{p}", f"Problem {p}: what is {p} times {p + 3}?", 0, True, 0.1, verify_hash=vhash)
        raw.add([{k: v for k, v in row.items() if k in RAW_SCHEMA.names}])
        if vhash is None:
            verified._next_index += 1  # keep the part numbers of raw/ and verified/ aligned
        else:
            verified.add([row])


def test_build_refuses_raw_parts_that_were_never_verified(tmp_path):
    run_dir = tmp_path / "run"
    _verified_run(run_dir, ["h", None, "h", None])  # e.g. generate --no-verify, then verify killed half-way
    with pytest.raises(RuntimeError, match=r"2 raw part\(s\).*part-00001.parquet, part-00003.parquet.*distill verify"):
        build(run_dir, BuildConfig(near_dup_threshold=None), base_dir=tmp_path, verify_hash="h")
    assert not (run_dir / "dataset").exists()


def test_build_refuses_parts_verified_under_other_settings(tmp_path):
    run_dir = tmp_path / "run"
    _verified_run(run_dir, ["new", "old", "new"])
    cfg = BuildConfig(near_dup_threshold=None)
    with pytest.raises(RuntimeError, match=r"1 verified part\(s\).*hash new\) \(part-00001.parquet\)"):
        build(run_dir, cfg, base_dir=tmp_path, verify_hash="new")
    with pytest.raises(RuntimeError, match="other than one another"):  # no recipe to compare with: they must agree
        build(run_dir, cfg, base_dir=tmp_path)
    _verified_run(tmp_path / "agreed", ["new", "new"])
    assert build(tmp_path / "agreed", cfg, base_dir=tmp_path, verify_hash="new")["kept"] == 2


def test_the_distill_build_command_checks_the_recipes_verify_settings(tmp_path):
    from pipeline.cli import main
    from pipeline.verify.config import VerifyConfig
    from pipeline.verify.stage import verify_hash

    run_dir = tmp_path / "run"
    _verified_run(run_dir, [verify_hash(VerifyConfig())] * 2)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": "run", "sources": [{"type": "humaneval"}]}))
    assert main(["build", str(run_dir), "build.near_dup_threshold=null", "-q"]) == 0
    assert main(["build", str(run_dir), "verify.math.timeout_s=99", "-q"]) == 2  # verdicts of other settings


# ---- replacing the previous dataset


def test_a_failed_swap_leaves_the_previous_dataset_in_place(built, monkeypatch):
    dataset_dir, _, _, cfg = built
    before = (dataset_dir / "manifest.json").read_text()
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == dataset_dir and Path(src).name == "dataset.partial":
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        build(dataset_dir.parent, cfg.model_copy(update={"seed": 1}), base_dir=dataset_dir.parent.parent)
    assert (dataset_dir / "manifest.json").read_text() == before and check_dataset(dataset_dir) == []


def test_a_crash_between_the_renames_is_undone_before_the_next_build(built):
    dataset_dir, _, _, _ = built
    before = (dataset_dir / "manifest.json").read_text()
    os.replace(dataset_dir, dataset_dir.with_name("dataset.previous"))  # the old one moved aside, then kill -9
    (dataset_dir.parent / "verified" / "part-00000.parquet").unlink()  # this build will refuse
    (dataset_dir.parent / "raw").mkdir()
    (dataset_dir.parent / "raw" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(RuntimeError, match="no verified part"):
        build(dataset_dir.parent, BuildConfig(), base_dir=dataset_dir.parent)
    assert (dataset_dir / "manifest.json").read_text() == before and check_dataset(dataset_dir) == []
    assert not dataset_dir.with_name("dataset.previous").exists()


# ---- the test split is decided per problem, before selection


def test_the_test_problems_include_those_the_teacher_never_solved(tmp_path):
    from eval.benchmarks import dataset_test_problems

    run_dir = tmp_path / "run"
    with PartWriter(run_dir / "verified", max_rows=8, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        for p in range(40):
            solved = p % 2 == 0
            prompt = f"Problem {p}: what is {p} plus {p * 3}?"
            writer.add([_row(f"p{p}", prompt, i, passed=solved and i == 0, entropy=0.1) for i in range(2)])
    cfg = BuildConfig(test_fraction=0.5, near_dup_threshold=None)
    stats = build(run_dir, cfg, base_dir=tmp_path)
    dataset = run_dir / "dataset"
    expected = {f"p{p}" for p in range(40) if is_test(cfg, f"p{p}")}
    assert any(int(pid[1:]) % 2 for pid in expected) and any(int(pid[1:]) % 2 == 0 for pid in expected)
    test_rows = pads.dataset(sorted((dataset / "data").glob("test-*.parquet"))).to_table().to_pylist()
    assert {r["problem_id"] for r in test_rows} == {pid for pid in expected if int(pid[1:]) % 2 == 0}
    records = pq.read_table(dataset / "test_problems.parquet").to_pylist()
    assert {r["problem_id"] for r in records} == expected and stats["test_problems"] == len(expected)
    rate = {r["problem_id"]: r["teacher_pass_rate"] for r in records}
    assert all(rate[pid] == (0.5 if int(pid[1:]) % 2 == 0 else 0.0) for pid in expected)
    # What `distill eval` answers on this build: every test problem, the unsolved ones included.
    assert {p.id for p in dataset_test_problems(dataset)} == expected
    assert check_dataset(dataset) == []
    (dataset / "test_problems.parquet").write_bytes(b"changed")
    assert check_dataset(dataset) == ["test_problems.parquet: size or sha256 differs from the manifest's"]


def test_rows_without_token_counts_or_entropy_build_and_leave_the_figures_out(tmp_path):
    # An endpoint that reports no usage gives null token counts; a run without logprobs gives null entropy.
    run_dir = tmp_path / "run"
    with PartWriter(run_dir / "verified", max_rows=40, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        writer.add([_row("p0", "first prompt about sheep", 0, True, 0.5)])
        writer.add(
            [
                _row(f"q{p}", f"prompt {p} about goats", 0, True, None, completion_tokens=None, entropy_top_k=None)
                for p in range(3)
            ]
        )
    stats = build(run_dir, BuildConfig(), base_dir=tmp_path)
    assert stats["kept"] == 4
    assert stats["tokens"]["completion_tokens"]["max"] == 100  # the one row that had a count
    assert sum(stats["histograms"]["completion_tokens"]["counts"]) == 1
