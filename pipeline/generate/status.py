"""`distill generate RECIPE --status`: which shards of a run are complete, partial (running, or stopped before
the end) or not started, for a run whose shards run as scheduler array tasks or on Ray actors.

Counted, not remembered: the recipe's problems are streamed once and each is looked up in its shard's ledger (the
parts' index files), so the answer is right even after sources changed or a task died without a word. A shard is
running when a live process holds its lock (`host pid` of that process is shown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.executor import Shard, id_hash
from pipeline.generate.config import GenerateConfig
from pipeline.generate.sources import stream_problems
from pipeline.parts import LOCKS_DIR, TOO_LONG_DIR, holder, read_ledger

COMPLETE, PARTIAL, NOT_STARTED = "complete", "partial", "not started"


@dataclass
class ShardState:
    label: str
    problems: int  # in the sources, owned by this shard
    done: int  # of those, in closed parts (or final as too long for the context)
    held_by: str | None  # `host pid` of the process working on it now

    @property
    def state(self) -> str:
        if self.problems and self.done >= self.problems:
            return COMPLETE
        return PARTIAL if self.done or self.held_by else NOT_STARTED


def shard_states(recipe: GenerateConfig) -> list[ShardState]:
    """The state of each of the recipe's `executor.shards` shards of its run."""
    run_dir, count = recipe.run_dir, recipe.executor.shards
    shards = [Shard(i, count) for i in range(count)]
    done = [read_ledger(run_dir / "raw", s) | read_ledger(run_dir / TOO_LONG_DIR, s) for s in shards]
    states = [ShardState(s.label, 0, 0, holder(run_dir / LOCKS_DIR / f"{s.label}.lock")) for s in shards]
    for problem in stream_problems(recipe.sources, Path(recipe.base_dir), rejects=[]):
        index = id_hash(problem.id) % count
        states[index].problems += 1
        states[index].done += problem.id in done[index]
    return states


def print_status(recipe: GenerateConfig) -> int:
    """Print the table; exit status 0 when every shard is complete, 1 otherwise (for a scheduler's dependency)."""
    states = shard_states(recipe)
    table = Table(title=f"distill generate --status: run {recipe.run_dir}")
    for column in ("shard", "problems", "done", "state", "held by"):
        table.add_column(column, justify="right" if column in ("problems", "done") else "left")
    for s in states:
        table.add_row(s.label, str(s.problems), str(s.done), s.state, s.held_by or "")
    complete = sum(s.state == COMPLETE for s in states)
    table.caption = (
        f"{complete} of {len(states)} shards complete; {sum(s.done for s in states)} of "
        f"{sum(s.problems for s in states)} problems done"
    )
    Console().print(table)
    return 0 if complete == len(states) else 1
