import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from pipeline.executor import WHOLE, Shard, ShardBusy
from pipeline.parts import (
    INDEX_DIR,
    PartWriter,
    ShardLock,
    closed_parts,
    holder,
    index_path,
    read_index,
    read_ledger,
    shard_parts,
)
from pipeline.records import RAW_SCHEMA, content_digest


def _rows(problem: str, n: int = 2) -> list[dict]:
    return [{"problem_id": problem, "sample_index": i, "completion": f"{problem}:{i}"} for i in range(n)]


def test_parts_close_every_n_rows_and_keep_a_problems_samples_together(tmp_path):
    with PartWriter(tmp_path, max_rows=3, max_seconds=3600) as writer:
        for problem in "abcde":
            writer.add(_rows(problem))
    parts = closed_parts(tmp_path)
    assert len(parts) == 3 == writer.parts_written
    for part in parts:
        ids = pq.read_table(part).column("problem_id").to_pylist()
        assert all(ids.count(i) == 2 for i in set(ids))
    assert read_ledger(tmp_path) == set("abcde")


def test_part_closes_after_max_seconds_even_when_no_more_rows_arrive(tmp_path):
    """A slow teacher sends nothing for minutes: the rows already finished must not wait in memory for the next."""
    with PartWriter(tmp_path, max_rows=1000, max_seconds=0.3) as writer:
        writer.add(_rows("a"))
        assert not closed_parts(tmp_path)
        deadline = time.monotonic() + 3
        while not closed_parts(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        parts = closed_parts(tmp_path)
        assert len(parts) == 1, "the part must close on its own after max_seconds, with no add() after it"
        assert pq.read_table(parts[0]).column("problem_id").to_pylist() == ["a", "a"]
        writer.add(_rows("b"))  # a later problem opens a new part, closed on exit
    assert len(closed_parts(tmp_path)) == 2 and read_ledger(tmp_path) == {"a", "b"}


def test_a_shards_next_writer_removes_its_killed_writers_temporary_files_and_no_other_shards(tmp_path):
    PartWriter(tmp_path, 10, 10).__exit__(None, None, None)  # nothing buffered: no part
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("done"))
    stray = tmp_path / "part-00001.parquet.otherhost.123.tmp"
    stray.write_bytes(b"PAR1 half a file")  # a part whose writer died before close: no footer
    stray_index = tmp_path / INDEX_DIR / "part-00001.json.otherhost.123.tmp"
    stray_index.write_text("[")
    other_shard = tmp_path / "part-s000of002-00000.parquet.otherhost.456.tmp"  # being written right now
    other_shard.write_bytes(b"PAR1 in progress")
    assert read_ledger(tmp_path) == {"done"}  # the ledger reads closed parts only
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("next"))
    assert not stray.exists() and not stray_index.exists()
    assert other_shard.exists(), "a writer of one shard must never touch another shard's files"
    # numbering continues after existing parts, never overwriting one
    assert [p.name for p in closed_parts(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]


def test_the_index_beside_each_part_gives_the_ledger_without_reading_the_part(tmp_path):
    row = {"domain": "math", "prompt": "1+1?", "reference": "2", "metadata": "{}"}
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add([row | {"problem_id": "a", "sample_index": i} for i in range(3)])
    part = closed_parts(tmp_path)[0]
    digest = content_digest("math", "1+1?", "2", "{}")
    assert json.loads(index_path(part).read_text()) == [["a", digest]]  # one entry per problem, not per row
    assert read_index(tmp_path) == {"a": digest}
    index_path(part).write_text(json.dumps([["from-the-index", "x"]]))
    assert read_index(tmp_path) == {"from-the-index": "x"}, "the ledger must come from the index, not the part"
    index_path(part).unlink()  # a part written before indexes existed: read from its own columns, same digest
    assert read_index(tmp_path) == {"a": digest}
    # an index whose part was never committed (killed between the two renames) is not a finished problem
    (tmp_path / INDEX_DIR / "part-00001.json").write_text(json.dumps([["never-committed", None]]))
    assert read_index(tmp_path) == {"a": digest}
    assert RAW_SCHEMA.names[:1] == ["problem_id"]


def test_the_ledger_of_a_shard_reads_only_parts_that_can_hold_its_problems(tmp_path):
    ids = [f"p{i}" for i in range(40)]
    for index in range(2):
        with PartWriter(tmp_path, 100, 100, shard=Shard(index, 2)) as writer:
            writer.add([r for i in ids if Shard(index, 2).owns(i) for r in _rows(i, 1)])
    with PartWriter(tmp_path, 100, 100) as writer:  # an earlier run of one shard answered some more
        writer.add([r for i in ["q1", "q2", "q3"] for r in _rows(i, 1)])
    for index in range(2):
        shard = Shard(index, 2)
        expected = {i for i in [*ids, "q1", "q2", "q3"] if shard.owns(i)}
        assert read_ledger(tmp_path, shard) == expected
    # shard 0's own index is read, shard 1's is not: corrupt shard 1's and shard 0's ledger is unchanged
    index_path(tmp_path / "part-s001of002-00000.parquet").write_text("not json")
    assert read_ledger(tmp_path, Shard(0, 2)) == {i for i in [*ids, "q1", "q2", "q3"] if Shard(0, 2).owns(i)}
    # another count reads every part; a damaged index is read past, from its part's own columns
    assert read_ledger(tmp_path, Shard(1, 3)) == {i for i in [*ids, "q1", "q2", "q3"] if Shard(1, 3).owns(i)}


HOLD = """
import sys, time
from pathlib import Path
from pipeline.executor import Shard
from pipeline.parts import ShardLock
lock = ShardLock(Path(sys.argv[1]), Shard(int(sys.argv[2]), int(sys.argv[3])))
print("held", flush=True)
time.sleep(600)
"""


def _hold(run_dir, index, count) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(index), str(count)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_one_writer_per_shard_and_one_shard_count_per_run_across_processes(tmp_path):
    proc = _hold(tmp_path, 0, 2)
    try:
        with pytest.raises(ShardBusy, match=rf"shard 0/2 .* in use by another process \({socket.gethostname()} "):
            ShardLock(tmp_path, Shard(0, 2))
        with ShardLock(tmp_path, Shard(1, 2)):  # the other shard of the same count: at the same time
            pass
        with pytest.raises(ShardBusy, match="another shard count"):  # shard 0 of 1 owns shard 0 of 2's problems
            ShardLock(tmp_path, WHOLE)
        with pytest.raises(ShardBusy, match="another shard count"):
            ShardLock(tmp_path, Shard(3, 4))
        assert holder(tmp_path / "locks" / "s000of002.lock") == f"{socket.gethostname()} {proc.pid}"
        assert holder(tmp_path / "locks" / "s001of002.lock") is None
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel releases a dead process's locks, however it died
        proc.wait()
    with ShardLock(tmp_path, Shard(0, 2)), ShardLock(tmp_path, Shard(1, 2)):  # one process may hold several
        pass
    ShardLock(tmp_path, WHOLE).release()


def test_parts_are_zstd_parquet(tmp_path):
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("a"))
    meta = pq.read_metadata(closed_parts(tmp_path)[0])
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert os.path.getsize(closed_parts(tmp_path)[0]) > 0


def test_each_shard_writes_parts_of_its_own_name_and_the_ledger_reads_them_all(tmp_path):
    with PartWriter(tmp_path, 10, 10) as writer:  # a run of one shard: the names of a run before shards
        writer.add(_rows("whole"))
    for shard, problem in [(Shard(1, 4), "a"), (Shard(1, 4), "b"), (Shard(0, 4), "c")]:
        with PartWriter(tmp_path, 10, 10, shard=shard) as writer:
            writer.add(_rows(problem))
    assert [p.name for p in closed_parts(tmp_path)] == [
        "part-00000.parquet",
        "part-s000of004-00000.parquet",  # numbered apart from shard 1's: no name of another shard is taken
        "part-s001of004-00000.parquet",
        "part-s001of004-00001.parquet",
    ]
    assert read_ledger(tmp_path) == {"whole", "a", "b", "c"}
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("again"))
    assert (tmp_path / "part-00001.parquet").exists()


def test_every_part_belongs_to_exactly_one_shard_whatever_the_shard_count(tmp_path):
    writers = [Shard(), Shard(0, 2), Shard(1, 2), Shard(3, 4)]
    for n, shard in enumerate(writers * 3):
        with PartWriter(tmp_path, 10, 10, shard=shard) as writer:
            writer.add(_rows(f"p{n}"))
    everything = closed_parts(tmp_path)
    assert len(everything) == 12
    for count in range(1, 6):
        owned = [shard_parts(tmp_path, Shard(i, count)) for i in range(count)]
        assert sorted(p for parts in owned for p in parts) == everything, f"{count} shards: owned twice or never"
    # a part written by shard i of 2 is shard i's when the count is again 2, whatever its name hashes to
    assert any(Shard(1, 2).owns(p.name) for p in everything if "s000of002" in p.name)
    assert [p.name.split("-")[1] for p in shard_parts(tmp_path, Shard(0, 2)) if "of002" in p.name] == ["s000of002"] * 3
    assert [p.name.split("-")[1] for p in shard_parts(tmp_path, Shard(1, 2)) if "of002" in p.name] == ["s001of002"] * 3
    assert shard_parts(tmp_path, Shard()) == everything
