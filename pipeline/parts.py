"""Crash-safe raw parts: the ledger of generation, so no teacher work is lost or repeated.

A Parquet file has its footer only after close(); a writer killed before that leaves an unreadable file that breaks
readers of the whole folder. So a part is written whole under a temporary name, fsynced, checked with
`pyarrow.parquet.read_metadata`, then renamed (atomic on POSIX). On restart, the problem ids in closed parts are done;
temporary leftovers are removed and their problems redone. Completions of one problem always share a part.
Each shard of a run (see pipeline/executor.py) writes parts of its own name, `part-s001of004-00000.parquet` for
shard 1 of 4 (a run of one shard keeps `part-00000.parquet`), so shards never collide; the ledger reads them all.
A problem the teacher rejected as too long for its context is final too: it goes to parts of its own
(RUN/too_long/, never read as completions), which the ledger reads as well, so a resume does not send it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.executor import WHOLE, Shard
from pipeline.records import RAW_SCHEMA

PART_GLOB = "part-*.parquet"
TOO_LONG_DIR = "too_long"  # beside raw/, not in it: readers of raw/ see completions only
# One row per problem the teacher refused as longer than its context (no completion exists for it).
TOO_LONG_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("error", pa.string()),
        ("config_hash", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
_PART_RE = re.compile(r"^part-(?:s(\d+)of(\d+)-)?(\d+)\.parquet$")  # shard index, shard count, part number


def closed_parts(folder: Path) -> list[Path]:
    """Every closed part of the folder, of every shard, sorted by name."""
    return sorted(p for p in Path(folder).glob(PART_GLOB) if _PART_RE.match(p.name))


def part_prefix(shard: Shard) -> str:
    """`part` for a run of one shard (so its names are those of a run before shards), else `part-s001of004`."""
    return "part" if shard.count == 1 else f"part-{shard.label}"


def shard_parts(folder: Path, shard: Shard) -> list[Path]:
    """The closed parts `shard` works on: those its own shard wrote in a run of as many shards; any other part (of a
    run of one shard, or of another shard count) by the hash of its name. So every part has exactly one owner."""
    owned = []
    for part in closed_parts(folder):
        index, count, _ = _PART_RE.match(part.name).groups()
        if count is not None and int(count) == shard.count and int(index) < shard.count:
            mine = int(index) == shard.index
        else:
            mine = shard.owns(part.name)
        if mine:
            owned.append(part)
    return owned


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Small files (stats, rejects, run.json) get the same write-rename treatment as parts."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write, fsync, check the footer reads back, then rename: a reader never sees a half-written Parquet file."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if pq.read_metadata(tmp).num_rows != table.num_rows:
        raise OSError(f"{tmp} reads back {pq.read_metadata(tmp).num_rows} rows, wrote {table.num_rows}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def update_stats(run_dir: Path, stage: str, stats: dict) -> None:
    """stats.json holds one section per stage; a stage rewrites only its own."""
    path = Path(run_dir) / "stats.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current[stage] = stats
    write_atomic_bytes(path, json.dumps(current, indent=2, default=str).encode())


def read_ledger(folder: Path) -> set[str]:
    """Problem ids present in closed parts; stray temporary files of a killed writer are deleted first."""
    for stray in Path(folder).glob("*.tmp"):
        stray.unlink()
    done: set[str] = set()
    for part in closed_parts(folder):
        done.update(pq.read_table(part, columns=["problem_id"]).column("problem_id").to_pylist())
    return done


class PartWriter:
    """Buffers whole problems' rows and closes a part every `max_rows` rows or `max_seconds` seconds.

    The seconds are kept by a background thread, not checked only when rows arrive: while a slow teacher returns
    nothing for minutes, the rows already finished still reach a closed part `max_seconds` after the first of them.
    Parts are named for `shard` (`part_prefix`) and numbered after the closed parts of that name only (`part-00003`
    is not one of `part-s001of004`'s, nor back).
    """

    def __init__(
        self, folder: Path, max_rows: int, max_seconds: float, schema: pa.Schema = RAW_SCHEMA, shard: Shard = WHOLE
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_seconds, self.schema = max_rows, max_seconds, schema
        self.prefix = part_prefix(shard)
        names = [p.name.rsplit("-", 1) for p in closed_parts(self.folder)]  # [prefix, "00003.parquet"]
        self._next_index = max((int(n.split(".")[0]) for prefix, n in names if prefix == self.prefix), default=-1) + 1
        self._rows: list[dict] = []
        self._opened_at = time.monotonic()
        self.parts_written = 0
        self.rows_written = 0
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._timer_failed = False  # then the next add (its part is due) or close flushes, and raises, here
        self._timer = threading.Thread(target=self._flush_when_due, name=f"parts-{self.folder.name}", daemon=True)
        self._timer.start()

    def add(self, rows: list[dict]) -> None:
        with self._lock:
            if not self._rows:
                self._opened_at = time.monotonic()
            self._rows.extend(rows)
            if len(self._rows) >= self.max_rows or self.due():
                self.flush()

    def due(self) -> bool:
        """True when the open part has waited `max_seconds`."""
        return bool(self._rows) and time.monotonic() - self._opened_at >= self.max_seconds

    def flush(self) -> Path | None:
        with self._lock:
            if not self._rows:
                return None
            final = self.folder / f"{self.prefix}-{self._next_index:05d}.parquet"
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
            write_table_atomic(table, final)
            self._next_index += 1
            self.parts_written += 1
            self.rows_written += table.num_rows
            self._rows = []
            return final

    def _flush_when_due(self) -> None:
        while not self._closed.wait(min(1.0, self.max_seconds / 4)):
            with self._lock:
                if not self._timer_failed and self.due():
                    try:
                        self.flush()
                    except Exception:  # e.g. a full disk: the rows stay buffered for the caller's thread to retry
                        self._timer_failed = True

    def close(self) -> None:
        """Stop the timer and close the open part: rows of finished problems are kept on Ctrl-C or error too."""
        self._closed.set()
        self._timer.join()
        self.flush()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunLock:
    """One writer per run folder: a second `distill generate` on the same run is refused, not interleaved."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / ".lock", "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(f"run {run_dir} is in use by another process (lock {run_dir / '.lock'})") from None

    def release(self) -> None:
        self._file.close()
