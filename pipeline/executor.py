"""Where a stage runs, kept apart from what it does.

A stage step (`generate_shard`, `verify_shard`) works on one `Shard` of its input: the problem ids (or raw parts)
that a stable hash assigns to shard `index` of `count`. An executor decides where the shards run and hands each step
its shard and the `Worker` it runs on; the step never reads a global to learn them. Executors:

- `LocalExecutor`: the shards in turn, in this process, on one worker (one engine serves them all). A scheduler
  array task (`distill generate RECIPE shard=I/N`, e.g. one Slurm array task) is a local executor of one shard.
- `pipeline.ray_executor.RayExecutor`: the shards on K Ray actors, each a worker that pulls shards until none are
  left (imported only when a recipe asks for it: Ray's import takes seconds).

The hash is sha256 of the id, not Python's `hash()`, which is salted per process: two processes (or two tasks of one
array) must agree on which shard owns a problem, or a problem would be answered twice or never.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


def id_hash(key: str) -> int:
    """The first 8 bytes of sha256(key): the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: owns the keys whose sha256 falls to it; `Shard()` owns everything."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need count >= 1 and 0 <= index < count")

    def owns(self, key: str) -> bool:
        """Stable across processes and machines: `id_hash(key)` modulo `count`."""
        return self.owns_hash(id_hash(key))

    def owns_hash(self, key_hash: int) -> bool:
        return key_hash % self.count == self.index

    @property
    def label(self) -> str:
        """For file names: `s001of004` is shard 1 of 4 (zero-padded, so names sort by shard)."""
        return f"s{self.index:03d}of{self.count:03d}"


WHOLE = Shard()  # the one shard of a run that is not split: owns every id


class ShardBusy(RuntimeError):
    """Another process holds the shard's lock: two writers of one shard would answer its problems twice."""


class Worker:
    """What one worker keeps between the shards it runs, so that an engine started for the first shard serves the
    next ones too. Closed (engines released) when its executor is done with it.

    `engine_in_process`: engines run their scheduler in the worker's own process (vLLM's in-process engine), so a
    worker killed by its executor leaves no orphan engine process holding memory and cores (a Ray actor).
    """

    def __init__(self, engine_in_process: bool = False) -> None:
        self.engine_in_process = engine_in_process
        self._kept: dict[str, Any] = {}
        self._stack = ExitStack()

    def keep(self, key: str, start: Callable[[], AbstractContextManager[T]]) -> T:
        """The resource kept under `key`, started (and entered) by `start()` on first use."""
        if key not in self._kept:
            self._kept[key] = self._stack.enter_context(start())
        return self._kept[key]

    def close(self) -> None:
        self._kept.clear()
        self._stack.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Work = Callable[[Shard, Worker], T]


class Executor(Protocol):
    """Runs `work` once per shard of its input and returns the results in shard order."""

    def run(self, work: Work) -> list[T]: ...


class LocalExecutor:
    """The given shards in turn, in this process, on one worker: by default one shard, the whole input."""

    def __init__(self, shards: int | list[Shard] = 1):
        if isinstance(shards, int):
            if shards < 1:
                raise ValueError(f"LocalExecutor(shards={shards}): need at least one shard")
            shards = [Shard(i, shards) for i in range(shards)]
        self.shards = list(shards)

    def run(self, work: Work) -> list[T]:
        with Worker() as worker:
            return [work(shard, worker) for shard in self.shards]
