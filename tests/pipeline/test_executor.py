"""Shards and the local executor: a stable hash partition of problem ids, and generate + verify + build over a run
split in two shards against the fake OpenAI-compatible server (tests/fake_openai.py), compared with one shard."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import load_recipe
from pipeline.executor import LocalExecutor, Shard
from pipeline.generate.sources import load_problems
from pipeline.generate.stage import generate
from pipeline.generate.status import shard_states
from pipeline.parts import PartWriter, closed_parts, holder
from pipeline.verify.stage import verify_run
from tests.conftest import ROOT, distill_command
from tests.fake_openai import FakeOpenAIServer, Reply
from tests.pipeline.generate.test_generate import write_recipe


@pytest.mark.parametrize(("index", "count"), [(0, 0), (-1, 2), (2, 2), (5, 3)])
def test_a_shard_outside_its_count_is_refused(index, count):
    with pytest.raises(ValueError, match=f"shard {index} of {count}"):
        Shard(index, count)


def test_a_local_executor_needs_a_shard_and_runs_each_in_order():
    with pytest.raises(ValueError, match="at least one shard"):
        LocalExecutor(0)
    workers = []
    assert LocalExecutor(3).run(
        lambda shard, worker: workers.append(worker) or (shard.index, shard.count, shard.label)
    ) == [
        (0, 3, "s000of003"),
        (1, 3, "s001of003"),
        (2, 3, "s002of003"),
    ]
    assert len(set(map(id, workers))) == 1, "one worker serves every shard: an engine started once serves them all"
    assert LocalExecutor().run(lambda shard, worker: shard) == [Shard(0, 1)]


def test_every_id_is_owned_by_exactly_one_shard_and_the_same_one_in_every_process():
    ids = [f"gsm8k/{i}" for i in range(300)]
    for count in (1, 2, 3, 7):
        owners = [[i for i in range(count) if Shard(i, count).owns(pid)] for pid in ids]
        assert all(len(o) == 1 for o in owners), f"{count} shards: an id owned twice or never"
        sizes = [sum(o == [i] for o in owners) for i in range(count)]
        assert min(sizes) > 300 / count / 2, f"{count} shards: a lopsided split {sizes}"
    # sha256("gsm8k/0") begins 1950c90912ecd129 (checked with sha256sum): modulo 4 its last hex digit 9 gives 1;
    # modulo 3 (16 is 1 modulo 3) its hex digits' sum 99 gives 0. So in every process, whatever PYTHONHASHSEED it
    # drew (Python's own hash() would differ from one process to the next):
    assert hashlib.sha256(b"gsm8k/0").hexdigest().startswith("1950c90912ecd129")
    assert [Shard(i, 4).owns("gsm8k/0") for i in range(4)] == [False, True, False, False]
    assert [Shard(i, 3).owns("gsm8k/0") for i in range(3)] == [True, False, False]


# ---- a run split in two shards, against one shard


PROBLEMS = [(f"What is {i} + {i}?", str(2 * i)) for i in range(1, 13)]


def _recipe(tmp_path: Path, url: str, name: str) -> Path:
    sections = {"output": {"part_rows": 6}, "verify": {"filters": {"enabled": []}}}
    return write_recipe(tmp_path, url, name, problems=PROBLEMS, **sections)


def _answer(body: dict) -> Reply:
    """Right for even sums below 20, wrong otherwise: both verdicts occur."""
    a = int(re.search(r"What is (\d+) \+", body["messages"][-1]["content"]).group(1))
    return Reply(content=f"So the sum is \\boxed{{{2 * a if a < 10 else 2 * a + 1}}}.", reasoning_content=f"{a}+{a}")


def _rows(folder: Path, columns: list[str]) -> set[tuple]:
    table = ds.dataset(folder, format="parquet").to_table(columns=columns)
    return set(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


# the stats of a run before shards, key for key: one shard (the default executor) keeps them as they were
GENERATE_KEYS = [
    "run",
    "config_hash",
    "teacher",
    "engine",
    "shards",
    "problems_total",
    "problems_resumed",
    "problems_answered",
    "problems_complete",
    "completions",
    "completion_tokens",
    "tokens_per_s",
    "completions_per_s",
    "generation_s",
    "elapsed_s",
    "rejected_rows",
    "rejected_too_long",
    "rejected_too_long_total",
    "infra_errors",
    "failures",
    "retries",
    "parts_written",
]
VERIFY_KEYS = [
    "parts",
    "parts_verified",
    "verify_hash",
    "rows",
    "passed",
    "failed",
    "infra_error",
    "data_fault",
    "data_faults",
    "reasons",
    "failed_filters",
    "kept",
    "by_domain",
    "elapsed_s",
    "rows_per_s",
    "all_parts",
]
COUNTS = ["problems_total", "problems_answered", "problems_complete", "completions", "completion_tokens"]
VERDICTS = ["rows", "passed", "failed", "infra_error", "data_fault", "kept", "reasons", "by_domain"]


def test_two_shards_make_the_rows_of_one_in_parts_of_their_own_and_resume_and_build(tmp_path):
    with FakeOpenAIServer(_answer) as server:
        one = load_recipe(_recipe(tmp_path, server.url, "one"))
        one_stats = generate(one, quiet=True)
        one_calls = server.chat_calls
        two = load_recipe(_recipe(tmp_path, server.url, "two"))
        two_stats = generate(two, quiet=True, executor=LocalExecutor(shards=2))
        assert server.chat_calls - one_calls == len(PROBLEMS), "each problem is asked once, by one shard"
        again = generate(two, quiet=True, executor=LocalExecutor(shards=2))
        whole = generate(two, quiet=True)  # the ledger reads every shard's parts, whatever the shard count now
        assert server.chat_calls - one_calls == len(PROBLEMS), "a finished run re-run made teacher calls"
    assert (again["problems_answered"], again["problems_resumed"], again["parts_written"]) == (0, len(PROBLEMS), 0)
    assert (whole["problems_answered"], whole["problems_complete"]) == (0, len(PROBLEMS))

    # the stats have today's shape; the counts of two shards add up to those of one
    assert list(one_stats) == list(two_stats) == GENERATE_KEYS
    assert one_stats["retries"] == two_stats["retries"] == {} and one_stats["failures"] == two_stats["failures"] == []
    assert {k: two_stats[k] for k in COUNTS} == {k: one_stats[k] for k in COUNTS}
    assert two_stats["problems_total"] == len(PROBLEMS) and two_stats["completions"] == 2 * len(PROBLEMS)
    assert two_stats["parts_written"] == len(closed_parts(two.run_dir / "raw"))

    # the same rows, in parts named for their shard, each shard's problems its own
    columns = ["problem_id", "sample_index", "prompt", "completion", "reasoning", "answer"]
    assert _rows(two.run_dir / "raw", columns) == _rows(one.run_dir / "raw", columns)
    assert [p.name for p in closed_parts(one.run_dir / "raw")] == [f"part-{n:05d}.parquet" for n in range(4)]
    problems_of: dict[int, set[str]] = {0: set(), 1: set()}
    for part in closed_parts(two.run_dir / "raw"):
        index = int(re.fullmatch(r"part-s00([01])of002-\d{5}\.parquet", part.name).group(1))
        ids = set(pq.read_table(part, columns=["problem_id"]).column("problem_id").to_pylist())
        assert all(Shard(index, 2).owns(pid) for pid in ids), f"{part.name} holds another shard's problems"
        problems_of[index] |= ids
    assert problems_of[0] and problems_of[1] and not problems_of[0] & problems_of[1]
    assert len(problems_of[0] | problems_of[1]) == len(PROBLEMS)

    # verify: each shard its own raw parts, into verified parts of the same names
    one_verdicts = verify_run(one.run_dir, one.verify, quiet=True)
    two_verdicts = verify_run(two.run_dir, two.verify, quiet=True, executor=LocalExecutor(shards=2))
    assert list(one_verdicts) == list(two_verdicts) == VERIFY_KEYS
    assert {k: two_verdicts[k] for k in VERDICTS} == {k: one_verdicts[k] for k in VERDICTS}
    assert 0 < one_verdicts["passed"] < one_verdicts["rows"] == 2 * len(PROBLEMS)
    raw_names = [p.name for p in closed_parts(two.run_dir / "raw")]
    assert [p.name for p in closed_parts(two.run_dir / "verified")] == raw_names
    assert two_verdicts["parts"] == two_verdicts["parts_verified"] == len(raw_names)
    verdict_columns = ["problem_id", "sample_index", "status", "reason"]
    assert _rows(two.run_dir / "verified", verdict_columns) == _rows(one.run_dir / "verified", verdict_columns)
    assert verify_run(two.run_dir, two.verify, quiet=True)["parts_verified"] == 0  # one shard now: nothing redone

    # build takes the two shards' verified parts as it takes one shard's
    for run in (one, two):
        assert main(["build", str(run.run_dir), "build.near_dup_threshold=null", "-q"]) == 0
    dataset_columns = ["problem_id", "sample_index", "answer"]
    assert _rows(two.run_dir / "dataset" / "data", dataset_columns) == _rows(
        one.run_dir / "dataset" / "data", dataset_columns
    )
    # one row per solved problem (1 + 1 to 9 + 9): a problem's two samples are the same text, kept once
    assert len(_rows(two.run_dir / "dataset" / "data", dataset_columns)) == 9


# ---- a scheduler array: one process per shard, at the same time, into one run folder


def _slow_answer(body: dict) -> Reply:
    return replace(_answer(body), delay_s=0.4)


def _start(recipe: Path, *overrides: str) -> subprocess.Popen:
    command = distill_command(str(recipe), *overrides, "-q", "--no-verify")
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_shard_processes_at_once_make_the_rows_of_one_process_and_a_third_on_a_busy_shard_is_refused(tmp_path):
    with FakeOpenAIServer(_slow_answer) as server:
        one = _recipe(tmp_path, server.url, "one")
        assert subprocess.run(distill_command(str(one), "-q", "--no-verify"), cwd=ROOT).returncode == 0
        array = _recipe(tmp_path, server.url, "array")
        array_dir = load_recipe(array).run_dir
        tasks = [_start(array, f"shard={i}/2", "teacher.concurrency=1") for i in range(2)]
        locks = [array_dir / "locks" / f"s00{i}of002.lock" for i in range(2)]
        # both at work at the same moment: each holds its shard's lock
        _wait_until(lambda: all(holder(lock) for lock in locks) or any(t.poll() is not None for t in tasks))
        assert [holder(lock).split()[1] for lock in locks] == [str(t.pid) for t in tasks]
        third = subprocess.run(
            distill_command(str(array), "shard=0/2", "-q"), cwd=ROOT, capture_output=True, text=True
        )
        assert third.returncode == 2 and "shard 0/2" in third.stderr and "in use by another process" in third.stderr
        whole = subprocess.run(distill_command(str(array), "-q"), cwd=ROOT, capture_output=True, text=True)
        assert whole.returncode == 2 and "another shard count" in whole.stderr  # the whole run owns both shards' ids
        assert [t.wait(timeout=300) for t in tasks] == [0, 0], [t.stderr.read() for t in tasks]
        status = subprocess.run(
            distill_command(str(array), "--status", "executor.shards=2"), cwd=ROOT, capture_output=True, text=True
        )
    assert status.returncode == 0 and status.stdout.count("complete") >= 2, status.stdout
    # verify and build read both shards' parts: the same rows as one process, none twice
    for run_dir in (load_recipe(one).run_dir, array_dir):
        assert main(["verify", str(run_dir), "-q"]) == 0
        assert main(["build", str(run_dir), "build.near_dup_threshold=null", "-q"]) == 0
    raw = ds.dataset(array_dir / "raw", format="parquet").to_table(columns=["problem_id", "sample_index"])
    keys = list(zip(raw.column("problem_id").to_pylist(), raw.column("sample_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 2 * len(PROBLEMS)
    for folder, columns in (
        ("raw", ["problem_id", "sample_index"]),
        ("verified", ["problem_id", "sample_index", "status"]),
        ("dataset/data", ["problem_id", "sample_index", "answer"]),
    ):
        assert _rows(array_dir / folder, columns) == _rows(load_recipe(one).run_dir / folder, columns), folder
    assert not list(array_dir.rglob("*.tmp"))


def test_status_names_complete_partial_and_not_started_shards(tmp_path):
    with FakeOpenAIServer(_answer) as server:
        recipe = load_recipe(_recipe(tmp_path, server.url, "status"), ["executor.shards=3", "executor.shard=1"])
        generate(recipe, quiet=True)
    states = shard_states(recipe)
    owned = [
        sum(Shard(i, 3).owns(p.id) for p in load_problems(recipe.sources, Path(recipe.base_dir))[0]) for i in range(3)
    ]
    assert [(s.label, s.problems, s.state) for s in states] == [
        ("s000of003", owned[0], "not started"),
        ("s001of003", owned[1], "complete"),
        ("s002of003", owned[2], "not started"),
    ]
    assert states[1].done == owned[1] and sum(owned) == len(PROBLEMS)
    # half a shard: one closed part of shard 0 holding one of its problems
    first = next(p for p in load_problems(recipe.sources, Path(recipe.base_dir))[0] if Shard(0, 3).owns(p.id))
    with PartWriter(recipe.run_dir / "raw", 10, 10, shard=Shard(0, 3)) as writer:
        writer.add([{"problem_id": first.id, "sample_index": 0}])
    assert shard_states(recipe)[0].state == ("partial" if owned[0] > 1 else "complete")
