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
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.executor import WHOLE, Shard, ShardBusy
from pipeline.records import CONTENT_COLUMNS, RAW_SCHEMA, content_digest

PART_GLOB = "part-*.parquet"
INDEX_DIR = "_index"  # a part's index beside it; pyarrow and datasets skip folders named _*
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


def _tmp_name(path: Path) -> Path:
    """A temporary name no other host or process uses: on a shared filesystem two writers of one file (stats.json,
    or a part name a crashed writer left half-written) must never write into each other's temporary file."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Small files (stats, rejects, run.json) get the same write-rename treatment as parts."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write, fsync, check the footer reads back, then rename: a reader never sees a half-written Parquet file."""
    tmp = _tmp_name(path)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if pq.read_metadata(tmp).num_rows != table.num_rows:
        raise OSError(f"{tmp} reads back {pq.read_metadata(tmp).num_rows} rows, wrote {table.num_rows}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def update_stats(run_dir: Path, stage: str, stats: dict) -> None:
    """stats.json holds one section per stage; a stage rewrites only its own, under the run lock, so that shards
    finishing at once on several hosts do not drop each other's sections."""
    path = Path(run_dir) / "stats.json"
    with run_lock(run_dir):
        current = json.loads(path.read_text()) if path.exists() else {}
        current[stage] = stats
        write_atomic_bytes(path, json.dumps(current, indent=2, default=str).encode())


def index_path(part: Path) -> Path:
    return part.parent / INDEX_DIR / (part.name.removesuffix(".parquet") + ".json")


def _part_index(part: Path) -> list[list]:
    """[problem id, content digest] of each problem in a closed part: its index file, written before the part was
    committed, or (a part of an older version, written without one) the part's own columns."""
    try:
        return json.loads(index_path(part).read_bytes())
    except (FileNotFoundError, ValueError):  # no index, or one damaged since: the part itself is the truth
        pass
    columns = pq.read_schema(part).names
    content = [c for c in CONTENT_COLUMNS if c in columns]
    table = pq.read_table(part, columns=["problem_id", *content]).to_pylist()
    if len(content) < len(CONTENT_COLUMNS):  # too_long/ parts: the id is all there is
        return [[i, None] for i in dict.fromkeys(r["problem_id"] for r in table)]
    return [[r["problem_id"], content_digest(*(r[c] for c in CONTENT_COLUMNS))] for r in table]


def _may_hold(part: Path, shard: Shard) -> bool:
    """A part of another shard of the same count holds none of `shard`'s problems: its index need not be read."""
    index, count, _ = _PART_RE.match(part.name).groups()
    return count is None or int(count) != shard.count or int(index) == shard.index


def read_index(folder: Path, shard: Shard = WHOLE) -> dict[str, str | None]:
    """Problem id -> content digest of every problem of `shard` in the folder's closed parts (of any shard count).

    Reads the parts' small index files, in parallel threads, not the parts: a resume of a run with a million
    finished problems starts in seconds. Parts of the same shard count but another index are not read at all.
    """
    parts = [p for p in closed_parts(folder) if _may_hold(p, shard)]
    done: dict[str, str | None] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for part, entries in zip(parts, pool.map(_part_index, parts), strict=True):
            if shard.count == 1 or _PART_RE.match(part.name)[2] == f"{shard.count:03d}":
                done.update(entries)  # a part of this very shard: every problem in it is the shard's
            else:
                done.update((i, d) for i, d in entries if shard.owns(i))
    return done


def read_ledger(folder: Path, shard: Shard = WHOLE) -> set[str]:
    """Problem ids of `shard` present in the folder's closed parts."""
    return set(read_index(folder, shard))


def remove_strays(folder: Path, shard: Shard) -> None:
    """Delete the temporary files (parts and index files) a killed writer of `shard` left: only its own, since
    another shard's writer may be writing its own at this moment. Called by that shard's next writer, under its lock.
    """
    stray = re.compile(rf"^{re.escape(part_prefix(shard))}-\d+\.(parquet|json)(\..+)?\.tmp$")
    for path in [*Path(folder).glob("*.tmp"), *(Path(folder) / INDEX_DIR).glob("*.tmp")]:
        if stray.match(path.name):
            path.unlink(missing_ok=True)


class PartWriter:
    """Buffers whole problems' rows and closes a part every `max_rows` rows or `max_seconds` seconds.

    The seconds are kept by a background thread, not checked only when rows arrive: while a slow teacher returns
    nothing for minutes, the rows already finished still reach a closed part `max_seconds` after the first of them.
    Parts are named for `shard` (`part_prefix`) and numbered after the closed parts of that name only (`part-00003`
    is not one of `part-s001of004`'s, nor back). Each part's index (its problem ids and their content digests,
    for `read_index`) is written, atomically, just before the part itself is: the part's rename is the only commit,
    so an index whose part never appeared is ignored, and overwritten by the next part of that name.
    The writer of a shard must hold its `ShardLock`: it removes the temporary files a killed writer of it left.
    """

    def __init__(
        self, folder: Path, max_rows: int, max_seconds: float, schema: pa.Schema = RAW_SCHEMA, shard: Shard = WHOLE
    ):
        self.folder = Path(folder)
        (self.folder / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        remove_strays(self.folder, shard)
        self.max_rows, self.max_seconds, self.schema = max_rows, max_seconds, schema
        self._with_content = all(c in schema.names for c in CONTENT_COLUMNS)
        self.prefix = part_prefix(shard)
        names = (_PART_RE.match(p.name) for p in closed_parts(self.folder))
        mine = [int(m[3]) for m in names if ("part" if m[1] is None else f"part-s{m[1]}of{m[2]}") == self.prefix]
        self._next_index = max(mine, default=-1) + 1
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

    def _index(self) -> bytes:
        entries: dict[str, str | None] = {}
        for row in self._rows:
            if row["problem_id"] not in entries:
                content = (row.get(c) for c in CONTENT_COLUMNS)
                entries[row["problem_id"]] = content_digest(*content) if self._with_content else None
        return json.dumps([[i, d] for i, d in entries.items()]).encode()

    def flush(self) -> Path | None:
        with self._lock:
            if not self._rows:
                return None
            final = self.folder / f"{self.prefix}-{self._next_index:05d}.parquet"
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
            write_atomic_bytes(index_path(final), self._index())
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


# Locks are POSIX record locks (fcntl.lockf): they work on NFS (through its lock manager) and on Lustre mounted with
# `-o flock`, are released by the kernel when their process dies however it dies (SIGKILL included), and, unlike
# flock(), are not inherited by a child the process forks (an engine's worker must not keep a shard locked after its
# parent died). They are per process: a process never conflicts with itself, so one process runs its shards in turn.
LOCKS_DIR = "locks"


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def run_lock(run_dir: Path):
    """Held for a moment, by whoever rewrites a run-wide file (run.json, recipe.yaml, stats.json): waits its turn."""
    fd = _open_lock(Path(run_dir) / LOCKS_DIR / "run.lock")
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ShardLock:
    """One writer per shard: a second process asking for a shard another one works on is refused (`ShardBusy`).

    Shards of one run may be worked on at once only with one shard count: shard 0 of 2 and shard 0 of 1 both own
    some of the same problems. So each holder also takes a shared lock on byte N (its count) of `locks/count.lock`
    and requires every other byte free. The lock file of a shard holds `host pid` of its holder, for `--status`.
    """

    def __init__(self, run_dir: Path, shard: Shard):
        self.path = Path(run_dir) / LOCKS_DIR / f"{shard.label}.lock"
        self._count_fd = _open_lock(self.path.parent / "count.lock")
        self._fd = _open_lock(self.path)
        try:
            self._lock_count(shard.count)
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ShardBusy(
                    f"shard {shard.index}/{shard.count} of run {run_dir} is in use by another process "
                    f"({holder(self.path) or 'unknown'}); run another shard, or wait for it to finish"
                ) from None
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _lock_count(self, count: int) -> None:
        fcntl.lockf(self._count_fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, count)
        try:  # every other count free: an exclusive lock on [0, count) and [count + 1, end) is granted, then dropped
            fcntl.lockf(self._count_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, count, 0)
            fcntl.lockf(self._count_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, count + 1)
        except OSError:
            raise ShardBusy(
                f"run {self.path.parent.parent} is being generated with another shard count by another process; "
                f"every process of a run must use the same executor.shards (this one: {count})"
            ) from None
        fcntl.lockf(self._count_fd, fcntl.LOCK_UN, count, 0)
        fcntl.lockf(self._count_fd, fcntl.LOCK_UN, 0, count + 1)

    def release(self) -> None:
        for fd in (self._fd, self._count_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._count_fd = None

    def __enter__(self) -> ShardLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(lock_path: Path) -> str | None:
    """`host pid` of the process holding a shard lock, or None when it is free. Call it only from a process that
    does not hold that lock itself: closing any descriptor of a lock file drops the process's own POSIX lock on it."""
    if not lock_path.exists():
        return None
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
    else:
        return None
    finally:
        os.close(fd)
