"""`distill generate` on Ray: a local cluster of 2 actors, each with its own in-process vLLM engine (the embedded
teacher on CPU), against a one-process run of the same problems through the session's vLLM server. The actors and
then the driver are SIGKILLed mid-run; re-running the same command finishes the run with every (problem,
sample) exactly once and no temporary file left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from pipeline.executor import Shard
from pipeline.parts import LOCKS_DIR, closed_parts, holder
from tests.conftest import ROOT, distill_command, read_stats, run_distill, sample_keys, small_recipe

N_PROBLEMS = 12 + 4  # small_recipe: 12 demo math problems and 4 reasoning-gym ones
N_SAMPLES = 2
RAY = ["executor.type=ray", "executor.workers=2", "executor.shards=4"]


def _env() -> dict[str, str]:
    # two engines beside the session's server on a 24 GiB machine: a small KV cache each (plenty for 16 problems)
    return dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_CPU_KVCACHE_SPACE="1")


def _wait_for(predicate, timeout: float, what: str):
    """Poll until `predicate` returns something truthy, and return it."""
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def _holders(run_dir: Path) -> dict[str, int]:
    """Shard label -> pid of the actor working on it now."""
    held = {}
    for lock in (run_dir / LOCKS_DIR).glob("s*.lock"):
        if who := holder(lock):
            held[lock.stem] = int(who.split()[1])
    return held


def _parts(run_dir: Path, label: str = "") -> int:
    return len(list((run_dir / "raw").glob(f"part-{label}*.parquet")))


def _assert_complete(run_dir: Path, expected: set[tuple[str, int]]) -> None:
    keys = sample_keys(run_dir)
    assert len(keys) == len(set(keys)), "a (problem_id, sample_index) written twice"
    assert set(keys) == expected
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_ray_workers_and_the_driver_killed_mid_run_then_the_same_command_finishes_the_run(vllm_server, tmp_path):
    # the one-process run of the same problems (served by the session's server: its own engine, same problems)
    reference = small_recipe(tmp_path, "one-process", output={"part_rows": 2})
    served = ["teacher.backend=openai", f"teacher.endpoints=[{vllm_server.url}]"]
    assert run_distill(str(reference), *served, "--quiet", "--no-verify").returncode == 0
    expected = set(sample_keys(tmp_path / "runs" / "one-process"))
    assert len(expected) == N_PROBLEMS * N_SAMPLES

    recipe = small_recipe(tmp_path, "ray", output={"part_rows": 2})  # a part per problem: many moments to kill at
    run_dir = tmp_path / "runs" / "ray"
    command = distill_command(str(recipe), *RAY, "--quiet", "--no-verify")
    driver = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the holder is picked from the same reading of the locks that found it: a shard can be finished and
        # released between two readings
        def holder_of(enough_parts) -> tuple[str, int] | bool:
            assert driver.poll() is None, f"the run ended before the kills: {driver.stderr.read()}"
            held = _holders(run_dir)
            return next(((lbl, p) for lbl, p in held.items() if enough_parts(_parts(run_dir, lbl))), False)

        # moment 1: an actor holds its shard and has written nothing of it yet (its engine is starting)
        label, pid = _wait_for(lambda: holder_of(lambda n: n == 0), 300, "a shard taken by an actor")
        os.kill(pid, signal.SIGKILL)

        # moment 2: an actor (restarted or the other one) mid-shard, with closed parts of it written
        label, pid = _wait_for(lambda: holder_of(lambda n: n >= 1), 600, "an actor mid-shard")
        os.kill(pid, signal.SIGKILL)
        # then the driver itself, once more parts are closed
        parts_then = _parts(run_dir)
        _wait_for(lambda: _parts(run_dir) > parts_then or driver.poll() is not None, 600, "more parts")
        assert driver.poll() is None, f"the run ended before the driver could be killed: {driver.stderr.read()}"
        actors = list(_holders(run_dir).values())
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    # closed parts only: the killed writers' half-written temporary files are still there until the next run
    done = {i for p in closed_parts(run_dir / "raw") for i in pq.read_table(p, columns=["problem_id"])[0].to_pylist()}
    assert len(done) < N_PROBLEMS, "the kills should have interrupted the run"
    # the local cluster the driver started goes with it: no actor is left holding a shard
    _wait_for(lambda: not any(psutil.pid_exists(p) for p in actors), 60, "the dead driver's actors to exit")

    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_complete(run_dir, expected)
    stats = read_stats(run_dir)
    assert stats["shards"] == [f"s00{i}of004" for i in range(4)] and stats["problems_complete"] == N_PROBLEMS
    assert 0 < stats["problems_resumed"] < N_PROBLEMS
    for part in (run_dir / "raw").glob("part-*.parquet"):  # every part holds its own shard's problems only
        index = int(part.name.split("-")[1][1:4])
        ids = pq.read_table(part, columns=["problem_id"]).column("problem_id").to_pylist()
        assert all(Shard(index, 4).owns(i) for i in ids), part.name
    status = subprocess.run(
        distill_command(str(recipe), *RAY, "--status"), cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert status.returncode == 0 and status.stdout.count("complete") >= 4, status.stdout
