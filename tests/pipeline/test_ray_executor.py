"""The Ray executor on a real local Ray cluster of 2 one-CPU actors: shards pulled by idle actors, results in shard
order, a SIGKILLed actor restarted with its shard run again, an error in work raised with its own type, an actor
dead beyond max_restarts, and a cluster started by the executor shut down on Ctrl-C. The generate stage's runs on
Ray (the real teacher, a worker killed mid-shard, a killed driver) are tested with the stage.

The works below coordinate through marker files in tmp_path, not through sleeps of a guessed length: a work that must
overlap another waits for that one's file (with a deadline, so a wrong executor fails instead of hanging)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import ray

from pipeline.config_base import RecipeError
from pipeline.executor import LocalExecutor, Shard
from pipeline.ray_executor import RayExecutor, local_cluster_options
from tests.conftest import ROOT

DEADLINE_S = 120
# pytest imports this file as a top-level module the actors cannot import: its functions travel by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local cluster for the module (ray.init takes seconds); the executor uses it, and leaves it running."""
    ray.init(**local_cluster_options(2))
    yield
    ray.shutdown()


def wait_for(condition, what: str, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while not (value := condition()):
        if time.monotonic() > end:
            raise TimeoutError(f"waited {deadline_s} s for {what}")
        time.sleep(0.05)
    return value


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def shards(count: int) -> list[Shard]:
    return [Shard(i, count) for i in range(count)]


@contextlib.contextmanager
def resource(folder: Path):
    """Stands for an engine a worker keeps: its release writes closed-PID."""
    yield
    (folder / f"closed-{os.getpid()}").touch()


def test_shards_run_on_both_actors_in_order_with_the_drivers_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")  # set after ray.init: it reaches the actors all the same

    def work(shard, worker):
        worker.keep("engine", lambda: resource(tmp_path))
        (tmp_path / f"pid-{os.getpid()}").touch()
        wait_for(lambda: len(list(tmp_path.glob("pid-*"))) >= 2, "both actors to run a shard at once")
        env = os.environ
        return (
            shard.index,
            os.getpid(),
            id(worker),
            worker.engine_in_process,
            env["VLLM_CPU_KVCACHE_SPACE"],
            env["OMP_NUM_THREADS"],
        )

    results = RayExecutor(shards(8), workers=2).run(work)

    assert [r[0] for r in results] == list(range(8)), "results in shard order"
    pids = {r[1] for r in results}
    assert len(pids) == 2, "both actors ran shards"
    assert len({(r[1], r[2]) for r in results}) == 2, "one Worker per actor, kept from shard to shard"
    assert {r[3:] for r in results} == {(True, "7", "1")}, "in-process engines, the driver's env, one thread a CPU"
    assert {p.name for p in tmp_path.glob("closed-*")} == {f"closed-{p}" for p in pids}, "workers closed at the end"
    wait_for(lambda: all(gone(p) for p in pids), "the actors to be killed after the run")


def test_a_fast_worker_takes_more_shards(tmp_path):
    count = 6

    def work(shard, worker):
        with contextlib.suppress(FileExistsError):  # the first actor to get here is the slow one
            (tmp_path / "slow").open("x").write(str(os.getpid()))
        if (tmp_path / "slow").read_text() == str(os.getpid()):
            wait_for(lambda: len(list(tmp_path.glob("done-*"))) == count - 1, "the fast actor to do the rest")
        (tmp_path / f"done-{shard.index}").touch()
        return shard.index, os.getpid()

    results = RayExecutor(shards(count), workers=2).run(work)

    assert [r[0] for r in results] == list(range(count))
    slow = int((tmp_path / "slow").read_text())
    assert sorted(sum(pid == p for _, pid in results) for p in (slow, *{p for _, p in results} - {slow})) == [1, 5]


def test_a_killed_actor_is_restarted_and_its_shard_runs_again(tmp_path):
    def work(shard, worker):
        attempt = len(list(tmp_path.glob(f"shard{shard.index}-*"))) + 1
        (tmp_path / f"shard{shard.index}-{attempt}").write_text(str(os.getpid()))
        if shard.index == 1 and attempt == 1:
            time.sleep(DEADLINE_S)  # killed here
        return shard.index, os.getpid(), attempt

    executor = RayExecutor(shards(4), workers=2, max_restarts=1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(executor.run, work)
        killed = int(wait_for(lambda: (tmp_path / "shard1-1").exists() and (tmp_path / "shard1-1").read_text(), "1"))
        os.kill(killed, signal.SIGKILL)
        results = running.result(timeout=DEADLINE_S)

    assert [r[0] for r in results] == [0, 1, 2, 3]
    _, pid, attempt = results[1]
    assert attempt == 2 and pid != killed, "shard 1 ran again, on the restarted actor"
    assert [r[2] for r in results[::2]] == [1, 1], "the other shards ran once"
    assert gone(killed), "the killed actor's process left nothing behind"


def test_an_error_in_work_reaches_the_caller_with_its_type_and_stops_the_others(tmp_path):
    def work(shard, worker):
        if shard.index == 0:
            (tmp_path / "started-0").write_text(str(os.getpid()))
            time.sleep(DEADLINE_S)
            (tmp_path / "done-0").touch()
        wait_for(lambda: (tmp_path / "started-0").exists(), "shard 0 to start")
        raise RecipeError("sources.0.path: no such file")

    with pytest.raises(RecipeError, match=r"^sources\.0\.path: no such file$") as caught:
        RayExecutor(shards(3), workers=2).run(work)

    assert type(caught.value) is RecipeError, "the original exception, not a Ray wrapper"
    assert isinstance(caught.value.__cause__, ray.exceptions.RayTaskError), "with the remote traceback as cause"
    wait_for(lambda: gone(int((tmp_path / "started-0").read_text())), "the busy actor to be killed")
    assert not (tmp_path / "done-0").exists()


def test_an_actor_dead_beyond_max_restarts_stops_the_run_naming_its_shard(tmp_path):
    def work(shard, worker):
        if shard.index == 1:
            (tmp_path / f"attempt-{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return shard.index

    with pytest.raises(RuntimeError, match=r"shard 1 of 3 \(s001of003\).*died more than executor.max_restarts=1"):
        RayExecutor(shards(3), workers=2, max_restarts=1).run(work)
    assert len(list(tmp_path.glob("attempt-*"))) == 2, "run once, then once more on the restarted actor"


DRIVER = """
import os, sys, time
from pathlib import Path
import ray
from pipeline.executor import Shard
from pipeline.ray_executor import RayExecutor

folder = Path(sys.argv[1])
try:
    RayExecutor([Shard(0, 1)], gpus_per_worker=1000).run(lambda s, w: s.index)
except RuntimeError as err:
    print(err, ray.is_initialized(), flush=True)
print(RayExecutor([Shard(0, 2), Shard(1, 2)], workers=2).run(lambda s, w: s.index), ray.is_initialized(), flush=True)

def work(shard, worker):
    (folder / f"pid-{os.getpid()}").touch()
    time.sleep(120)

RayExecutor([Shard(0, 2), Shard(1, 2)], workers=2).run(work)
"""


def test_a_cluster_the_executor_started_is_shut_down_after_a_run_and_on_ctrl_c(tmp_path):
    """Without a cluster of the caller's, the executor starts one and stops it: no Ray process outlives the run.
    (Its local cluster has no GPU here: a run asking for one is refused rather than left waiting.)"""
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: driver.poll() is not None or len(list(tmp_path.glob("pid-*"))) == 2, "the actors' shards")
        assert driver.poll() is None, driver.communicate()
        actors = {int(p.name.removeprefix("pid-")) for p in tmp_path.glob("pid-*")}
        children = psutil.Process(driver.pid).children(recursive=True)  # raylet, GCS, workers
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=DEADLINE_S)
    finally:
        if driver.poll() is None:
            driver.kill()
    no_gpus, done = out.splitlines()
    assert no_gpus.startswith("executor.gpus_per_worker=1000, but this machine's local Ray cluster has ")
    assert no_gpus.endswith(" False"), "refused before any actor waits forever for a GPU, and its cluster shut down"
    assert done == "[0, 1] False", "a run: its results, and its cluster shut down"
    assert "KeyboardInterrupt" in err and driver.returncode != 0
    assert actors <= {c.pid for c in children}
    wait_for(lambda: all(gone(c.pid) for c in children), "every Ray process of the driver to exit")


def test_verify_runs_on_ray_actors_as_it_runs_here(tmp_path):
    """`distill verify` on the recipe's executor: each actor verifies its shards' raw parts, with verifiers kept
    between its shards; the verdicts are those of a verify in this process."""
    from pipeline.config import load_recipe
    from pipeline.generate.stage import generate
    from pipeline.verify.stage import verify_run
    from tests.fake_openai import FakeOpenAIServer, Reply
    from tests.pipeline.generate.test_generate import write_recipe

    problems = [(f"What is {i} + {i}?", str(2 * i)) for i in range(1, 9)]

    def answer(body: dict) -> Reply:  # right for the even problems only
        a = int(body["messages"][-1]["content"].split("What is ")[1].split(" +")[0])
        return Reply(content=f"\\boxed{{{2 * a + a % 2}}}")

    with FakeOpenAIServer(answer) as server:
        recipe = load_recipe(write_recipe(tmp_path, server.url, "v", problems=problems, output={"part_rows": 4}))
        generate(recipe, quiet=True, executor=LocalExecutor(shards=2))
    here = verify_run(recipe.run_dir, recipe.verify, quiet=True, executor=LocalExecutor(shards=2))
    for part in (recipe.run_dir / "verified").glob("*.parquet"):
        part.unlink()
    on_ray = verify_run(recipe.run_dir, recipe.verify, quiet=True, executor=RayExecutor(shards(2), workers=2))
    assert on_ray["parts_verified"] == here["parts_verified"] == here["parts"] >= 2
    for key in ("rows", "passed", "failed", "reasons"):
        assert on_ray[key] == here[key], key
    assert here["passed"] == 2 * 4 and here["rows"] == 2 * 8  # n=2 samples of 8 problems, the 4 even ones right
