"""The shards of a run on K Ray actors (Ray Core), each a `Worker` that keeps its engine from one shard to the next.

The driver hands one shard to each idle actor and the next pending shard to whichever actor finishes first, so a
fast worker takes more shards than a slow one (a static split would leave the fast one idle). Results come back in
shard order, as from `LocalExecutor`.

Failures, told apart because they call for different answers:

- an actor process that dies (SIGKILL, OOM, a crashed engine) is restarted by Ray up to `max_restarts` times, and its
  shard is run again on the restarted actor (`max_task_retries`); the shard resumes from its closed parts, so the
  retry costs only the part that was open. Beyond `max_restarts` the run stops with a RuntimeError naming the shard.
- an exception raised by `work` (a bad recipe, a broken source) is not retried: it would fail again. The other
  actors are killed and the caller gets the original exception (its own type and message, the Ray error with the
  remote traceback chained as its cause), so `except RecipeError` in the CLI still works.

Where a work runs: an actor's process is a Ray worker, not this process. On a local cluster started here it inherits
this process's cwd and environment as they were at `ray.init`; on an existing cluster (`address`) it has the cwd and
environment of the node's raylet, and the project must be installed there. So `work` must carry absolute paths (the
generate stage resolves the recipe's paths before dispatch), and the settings an engine reads from the environment
(`VLLM_*`, `HF_*`, `DISTILL_*`, ...) are sent to each actor explicitly (`runtime_env.env_vars`), as they are now.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections import deque
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from pipeline.executor import Shard, Work, Worker

# Environment variables an actor's engine or stage reads: sent to every actor, so that a setting made in the driver
# after `ray.init`, or on a cluster whose raylet never saw it, still applies.
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "DISTILL_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "PYTORCH_")
OBJECT_STORE_BYTES = 128 * 2**20  # results are small (a shard's counts); Ray's default takes 30% of RAM in /dev/shm
CLOSE_TIMEOUT_S = 120.0  # an actor's worker.close() releases its engine; past this it is killed anyway


def local_cluster_options(num_cpus: float) -> dict[str, Any]:
    """`ray.init` keywords for a local cluster of at least `num_cpus` CPUs (more than the machine has, if asked:
    2 workers of 1 CPU each must start on a 1-core machine too; the cores are shared, not reserved)."""
    return {
        "address": "local",  # without it, ray.init would join a cluster of `ray start` (and refuse num_cpus)
        "num_cpus": max(os.cpu_count() or 1, math.ceil(num_cpus)),
        "include_dashboard": False,
        "object_store_memory": OBJECT_STORE_BYTES,
        "logging_level": logging.WARNING,
        "log_to_driver": True,  # an actor's tracebacks and engine warnings reach the terminal
    }


def worker_env(cpus: float) -> dict[str, str]:
    """What an actor's process gets in its environment before it imports anything: the forwarded settings, and its
    thread count limited to its CPUs (torch reads OMP_NUM_THREADS once, at import, so setting it later is too late)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env["OMP_NUM_THREADS"] = str(max(1, math.floor(cpus)))
    return env


class ShardActor:
    """One worker for its life: runs `work(shard, worker)` for each shard it is given, in turn.

    Restarted by Ray after a death, it starts a fresh `Worker` (its engine starts again on the next shard)."""

    def __init__(self, work: Work, threads: int) -> None:
        if "torch" in sys.modules:  # unpickling `work` may have imported it before this ran
            sys.modules["torch"].set_num_threads(threads)
        self.work = work
        self.worker = Worker(engine_in_process=True)  # an engine dies with its actor: no orphan engine process

    def pid(self) -> int:
        return os.getpid()

    def run(self, shard: Shard) -> Any:
        return self.work(shard, self.worker)

    def close(self) -> None:
        self.worker.close()


RemoteShardActor = ray.remote(ShardActor)


class RayExecutor:
    """`shards` on `workers` Ray actors, on the cluster at `address` or on a local one started (and shut down) here."""

    def __init__(
        self,
        shards: list[Shard],
        workers: int = 1,
        address: str | None = None,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        max_restarts: int = 3,
    ) -> None:
        if workers < 1:
            raise ValueError(f"RayExecutor(workers={workers}): need at least one worker")
        self.shards = list(shards)
        self.workers = workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.max_restarts = max_restarts

    def run(self, work: Work) -> list[Any]:
        if not self.shards:
            return []
        started = self._connect()
        actors: list[Any] = []
        busy: dict[Any, int] = {}  # a running task's ref -> the index of its actor
        try:
            self._start_actors(work, min(self.workers, len(self.shards)), into=actors)
            return self._dispatch(actors, busy)
        finally:
            # On any exit (an error, KeyboardInterrupt): idle actors release their engines; busy ones are killed,
            # since a sync actor's running task cannot be interrupted and its engine dies with its process.
            try:
                self._stop(actors, busy)
            finally:
                if started:
                    ray.shutdown()

    def _connect(self) -> bool:
        """Connects (or starts a local cluster); True when this call started it, so `run` shuts it down."""
        if ray.is_initialized():  # the caller's connection (a test's shared cluster, a notebook)
            return False
        if self.address is not None:
            ray.init(address=self.address, logging_level=logging.WARNING)
            return True
        ray.init(**local_cluster_options(self.workers * self.cpus_per_worker))  # a new one, even beside `ray start`
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < self.gpus_per_worker:  # the actors would wait forever for GPUs that are not there
                raise RuntimeError(
                    f"executor.gpus_per_worker={self.gpus_per_worker}, but this machine's local Ray cluster has "
                    f"{gpus:g} GPUs: lower executor.gpus_per_worker, or give executor.address of a cluster with GPUs"
                )
        except BaseException:
            ray.shutdown()
            raise
        return True

    def _start_actors(self, work: Work, count: int, into: list[Any]) -> None:
        """Appends each actor as it is created, so that an interrupt between two still kills the first."""
        options = {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_restarts,  # a task of an actor that died runs again on its restart
            "runtime_env": {"env_vars": worker_env(self.cpus_per_worker)},
        }
        threads = max(1, math.floor(self.cpus_per_worker))
        for _ in range(count):
            into.append(RemoteShardActor.options(**options).remote(work, threads))

    def _dispatch(self, actors: list[Any], busy: dict[Any, int]) -> list[Any]:
        pending = deque(range(len(self.shards)))
        shard_of: dict[Any, int] = {}
        results: list[Any] = [None] * len(self.shards)

        def give(actor_index: int) -> None:
            i = pending.popleft()
            ref = actors[actor_index].run.remote(self.shards[i])
            busy[ref] = actor_index
            shard_of[ref] = i

        for a in range(len(actors)):
            give(a)
        while busy:
            [ref], _ = ray.wait(list(busy), num_returns=1)
            i = shard_of.pop(ref)
            try:
                results[i] = ray.get(ref)
            except RayTaskError as err:  # raised by `work` itself (an actor death is a RayActorError instead)
                busy.pop(ref)
                cause = err.cause
                if isinstance(cause, Exception):
                    raise cause from err
                raise
            except RayError as err:  # the actor died more than max_restarts times (or its node did)
                busy.pop(ref)
                shard = self.shards[i]
                if getattr(err, "actor_init_failed", False):  # e.g. `work` does not unpickle on the worker's node
                    raise RuntimeError(
                        f"shard {shard.index} of {shard.count} ({shard.label}): its Ray worker could not start. The "
                        "project must be importable on every node of the cluster (installed in the same "
                        f"environment as here): {err}"
                    ) from err
                raise RuntimeError(
                    f"shard {shard.index} of {shard.count} ({shard.label}): its Ray worker died more than "
                    f"executor.max_restarts={self.max_restarts} times ({type(err).__name__}). The shards' closed "
                    "parts are kept: run the same command again to resume, and raise executor.max_restarts (or "
                    "find what kills the worker: memory, the engine's log above) if it keeps dying"
                ) from err
            actor_index = busy.pop(ref)
            if pending:
                give(actor_index)
        return results

    def _stop(self, actors: list[Any], busy: dict[Any, int]) -> None:
        """worker.close() on each idle actor (engines released cleanly), then every actor killed, without restarts.
        A busy actor's task is cancelled first, so that Ray does not log it as failed with retries remaining."""
        for ref in busy:
            with contextlib.suppress(RayError, ValueError):
                ray.cancel(ref)
        try:
            closing = [a.close.remote() for i, a in enumerate(actors) if i not in busy.values()]
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        finally:
            for actor in actors:
                with contextlib.suppress(RayError, ValueError):
                    ray.kill(actor, no_restart=True)
