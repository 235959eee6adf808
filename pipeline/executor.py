"""Where a stage runs, kept apart from what it does.

A stage step (`generate_shard`, `verify_shard`) works on one `Shard` of its input: the problem ids (or raw parts)
that a stable hash assigns to shard `index` of `count`. An executor decides where the shards run and hands each step
its shard; the step never reads a global to learn it. Today the only executor is `LocalExecutor`, the shards in turn
in this process (the CLI runs one shard, the whole input). A scheduler array (one shard per array task, `shard=I/N`)
or Ray actors are further executors with the same `run`: the steps stay as they are.

The hash is sha256 of the id, not Python's `hash()`, which is salted per process: two processes (or two runs of one
array) must agree on which shard owns a problem, or a problem would be answered twice or never.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: owns the keys whose sha256 falls to it; `Shard()` owns everything."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need count >= 1 and 0 <= index < count")

    def owns(self, key: str) -> bool:
        """Stable across processes and machines: the first 8 bytes of sha256(key), modulo `count`."""
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % self.count == self.index

    @property
    def label(self) -> str:
        """For file names: `s001of004` is shard 1 of 4 (zero-padded, so names sort by shard)."""
        return f"s{self.index:03d}of{self.count:03d}"


WHOLE = Shard()  # the one shard of a run that is not split: owns every id


class Executor(Protocol):
    """Runs `work` once per shard of its input and returns the results in shard order."""

    def run(self, work: Callable[[Shard], T]) -> list[T]: ...


class LocalExecutor:
    """Every shard in turn, in this process: with `shards=1` (the default) one step over the whole input."""

    def __init__(self, shards: int = 1):
        if shards < 1:
            raise ValueError(f"LocalExecutor(shards={shards}): need at least one shard")
        self.shards = [Shard(i, shards) for i in range(shards)]

    def run(self, work: Callable[[Shard], T]) -> list[T]:
        return [work(shard) for shard in self.shards]
