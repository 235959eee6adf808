"""Final dataset shards in the Hugging Face folder layout, written so a crash never leaves a plausible-looking lie.

`DATASET/data/{split}-{i:05d}-of-{n:05d}.parquet` is what `datasets.load_dataset` and the Hub recognise without a
loading script. Each shard streams into a temporary file and is renamed only once closed, fsynced and its footer read
back; `manifest.json` goes last, so a folder without one is an unfinished build, and its sizes and sha256 let
`check_dataset` notice later truncation, bit rot or files copied in by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.parts import _fsync_dir, write_atomic_bytes, write_table_atomic

MANIFEST = "manifest.json"
TEST_PROBLEMS = "test_problems.parquet"  # every test problem of a build, solved or not (beside data/, not a split)
_ENTRY_KEYS = {"split", "file", "rows", "bytes", "sha256"}
_SPLIT_RE = re.compile(r"\w+")  # the split names `datasets` accepts in file names


def plan_shards(total_rows: int, estimated_bytes: int, target_mb: float) -> list[int]:
    """Balanced row counts (differing by at most one) so no shard is a tiny tail that skews per-shard loading."""
    if total_rows < 0 or estimated_bytes < 0 or target_mb <= 0:
        raise ValueError(f"need rows, bytes >= 0 and target_mb > 0: {total_rows}, {estimated_bytes}, {target_mb}")
    if total_rows == 0:
        return [0]  # one empty shard keeps the split visible to loaders
    n_shards = min(total_rows, max(1, math.ceil(estimated_bytes / (target_mb * 2**20))))
    base, extra = divmod(total_rows, n_shards)
    return [base + 1] * extra + [base] * (n_shards - extra)


def shard_name(split: str, index: int, count: int) -> str:
    if not _SPLIT_RE.fullmatch(split):
        raise ValueError(f"split name {split!r} must be letters, digits or underscores to be found by loaders")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside 0..{count - 1}")
    return f"data/{split}-{index:05d}-of-{count:05d}.parquet"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Cuts rows arriving in any batch sizes into the planned shards, holding at most one row group in memory."""

    def __init__(self, dataset_dir: Path, split: str, schema: pa.Schema, row_counts: list[int], group_rows=10_000):
        if not row_counts or any(c < 0 for c in row_counts):
            raise ValueError(f"split {split!r}: row counts must be a non-empty list of counts >= 0, got {row_counts}")
        self.dataset_dir, self.split, self.schema = Path(dataset_dir), split, schema
        self.row_counts, self.group_rows = list(row_counts), group_rows
        self.names = [shard_name(split, i, len(row_counts)) for i in range(len(row_counts))]
        (self.dataset_dir / "data").mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.rows_received = 0
        self._index = 0  # shard being filled
        self._in_shard = 0  # rows of it written or pending
        self._pending: list[pa.Table] = []  # at most one row group, written in full groups
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._closed = False

    def _paths(self) -> tuple[Path, Path]:
        final = self.dataset_dir / self.names[self._index]
        return final, final.with_name(final.name + ".tmp")

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self._closed:
            raise RuntimeError(f"split {self.split!r}: write after close")
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"split {self.split!r}: batch schema does not match the dataset's: {e}") from e
        planned = sum(self.row_counts)
        if self.rows_received + table.num_rows > planned:
            raise ValueError(
                f"split {self.split!r}: planned {planned} rows, got at least {self.rows_received + table.num_rows}"
            )
        self.rows_received += table.num_rows
        offset = 0
        while offset < table.num_rows:
            take = min(self.row_counts[self._index] - self._in_shard, table.num_rows - offset)
            self._pending.append(table.slice(offset, take))
            self._pending_rows += take
            self._in_shard += take
            offset += take
            if self._pending_rows >= self.group_rows:
                self._flush_pending(whole_groups_only=True)
            self._finish_full_shards()

    def _flush_pending(self, whole_groups_only: bool = False) -> None:
        """Input batch sizes must not dictate row groups: only full groups go out, except at a shard's end."""
        n = self._pending_rows // self.group_rows * self.group_rows if whole_groups_only else self._pending_rows
        if n == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._paths()[1], self.schema, compression="zstd")
        pending = pa.concat_tables(self._pending)
        self._writer.write_table(pending.slice(0, n), row_group_size=self.group_rows)
        self._pending, self._pending_rows = ([pending.slice(n)] if n < pending.num_rows else []), pending.num_rows - n

    def _finish_full_shards(self) -> None:
        while self._index < len(self.row_counts) and self._in_shard == self.row_counts[self._index]:
            final, tmp = self._paths()
            if self._writer is None and not self._pending:  # a planned empty shard
                write_table_atomic(self.schema.empty_table(), final)
            else:
                self._flush_pending()
                self._writer.close()
                self._writer = None
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                rows = pq.read_metadata(tmp).num_rows
                if rows != self._in_shard:
                    raise OSError(f"{tmp} reads back {rows} rows, wrote {self._in_shard}")
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            entry = {"split": self.split, "file": self.names[self._index], "rows": self._in_shard}
            self.entries.append(entry | {"bytes": final.stat().st_size, "sha256": _sha256(final)})
            self._index += 1
            self._in_shard = 0

    def abort(self) -> None:
        """Drop the unfinished shard's temporary file; finished shards stay, but without a manifest."""
        self._closed = True
        self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._index < len(self.row_counts):
            self._paths()[1].unlink(missing_ok=True)

    def close(self) -> list[dict]:
        """Manifest entries; fewer rows than planned is an error, never a silently short shard."""
        if self._closed:
            raise RuntimeError(f"split {self.split!r}: closed twice")
        self._finish_full_shards()  # planned empty shards
        if self._index < len(self.row_counts):
            self.abort()
            raise ValueError(
                f"split {self.split!r}: planned {sum(self.row_counts)} rows in {len(self.row_counts)} "
                f"shards, got {self.rows_received}"
            )
        self._closed = True
        return self.entries


def file_entry(dataset_dir: Path, name: str, rows: int) -> dict:
    """Manifest entry of a file beside the shards (the test problems): checked like a shard by `check_dataset`."""
    path = Path(dataset_dir) / name
    return {"file": name, "rows": rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(dataset_dir: Path, entries: list[dict], recipe_hash: str, extra: dict | None = None) -> Path:
    """The last step of a build: its presence is what marks the folder finished, so it never lists a missing file."""
    dataset_dir = Path(dataset_dir)
    if not entries:
        raise ValueError("a manifest needs at least one shard")
    for entry in entries:
        path = dataset_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{entry['file']}: missing or not {entry['bytes']} bytes; refusing to write the manifest")
    schema = pq.read_schema(dataset_dir / entries[0]["file"])
    core = {"recipe_hash": recipe_hash, "schema": schema.to_string(show_schema_metadata=False), "shards": entries}
    clash = set(extra or {}) & set(core)
    if clash:
        raise ValueError(f"manifest extra keys {sorted(clash)} would overwrite core fields")
    path = dataset_dir / MANIFEST
    write_atomic_bytes(path, json.dumps({**core, **(extra or {})}, indent=2).encode())
    _fsync_dir(dataset_dir)
    return path


def check_dataset(dataset_dir: Path) -> list[str]:
    """Every way a shipped folder can silently differ from what was built; each problem names the file."""
    dataset_dir = Path(dataset_dir)
    try:
        manifest = json.loads((dataset_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{MANIFEST}: missing in {dataset_dir} (unfinished build)"]
    except (OSError, ValueError) as e:
        return [f"{MANIFEST}: unreadable ({e})"]
    problems = []
    shards = manifest.get("shards", []) if isinstance(manifest, dict) else []
    if not shards or not all(isinstance(e, dict) and e.keys() >= _ENTRY_KEYS for e in shards):
        return [f"{MANIFEST}: no shard list, or an entry lacks one of {sorted(_ENTRY_KEYS)}"]
    for entry in shards:
        name, path = entry["file"], dataset_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest's")
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as e:
            problems.append(f"{name}: unreadable Parquet footer ({e})")
            continue
        if meta.num_rows != entry["rows"]:
            problems.append(f"{name}: {meta.num_rows} rows, manifest says {entry['rows']}")
        if meta.schema.to_arrow_schema().to_string(show_schema_metadata=False) != manifest.get("schema"):
            problems.append(f"{name}: schema differs from the manifest's")
    extra = manifest.get("test_problems")
    if extra is not None:
        path = dataset_dir / extra["file"]
        if not path.is_file():
            problems.append(f"{extra['file']}: listed in the manifest but missing")
        elif path.stat().st_size != extra["bytes"] or _sha256(path) != extra["sha256"]:
            problems.append(f"{extra['file']}: size or sha256 differs from the manifest's")
        elif pq.read_metadata(path).num_rows != extra["rows"]:
            problems.append(f"{extra['file']}: row count differs from the manifest's")
    listed = {entry["file"] for entry in shards}
    for path in sorted((dataset_dir / "data").rglob("*.parquet")):
        name = path.relative_to(dataset_dir).as_posix()
        if name not in listed:
            problems.append(f"{name}: Parquet file not listed in the manifest")
    return problems
