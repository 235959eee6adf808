"""Live progress of a generation run (rich) and its closing summary table; silent with --quiet."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class GenerationProgress:
    def __init__(self, total: int | None, already_done: int, quiet: bool):
        """`total` None: not known before the end (the sources are streamed)."""
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.started = time.monotonic()
        self.completions = 0
        self.tokens = 0
        self._progress = Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("problems"),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self._task = self._progress.add_task("generate", total=total, completed=already_done, rates="")

    def __enter__(self) -> GenerationProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, completions: int, tokens: int) -> None:
        self.completions += completions
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rates = f"{self.completions / elapsed:.2f} compl/s  {self.tokens / elapsed:.1f} tok/s"
        self._progress.update(self._task, advance=1, rates=rates)

    def summary(self, stats: dict) -> None:
        if self.quiet:
            return
        table = Table(title=f"distill generate: run {stats['run']}")
        table.add_column("what")
        table.add_column("value", justify="right")
        rows = [
            ("problems in sources", stats["problems_total"]),
            ("skipped (already in parts)", stats["problems_resumed"]),
            ("answered now", stats["problems_answered"]),
            ("complete in run", stats["problems_complete"]),
            ("completions written", stats["completions"]),
            ("generated tokens", stats["completion_tokens"]),
            ("tokens/s", f"{stats['tokens_per_s']:.1f}"),
            ("rejected rows (rejects.jsonl)", stats["rejected_rows"]),
            (
                "too long for the context (now / in run)",
                f"{stats['rejected_too_long']} / {stats['rejected_too_long_total']}",
            ),
            ("infrastructure errors (retried next run)", stats["infra_errors"]),
            ("request retries", stats["retries"].get("retries", 0)),
            ("parts written", stats["parts_written"]),
            ("elapsed", f"{stats['elapsed_s']:.1f}s"),
        ]
        for name, value in rows:
            table.add_row(name, str(value))
        self.console.print(table)
