import os
import time

import pyarrow.parquet as pq
import pytest

from pipeline.executor import Shard
from pipeline.parts import PartWriter, RunLock, closed_parts, read_ledger, shard_parts


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


def test_ledger_ignores_and_removes_a_killed_writers_temporary_part(tmp_path):
    PartWriter(tmp_path, 10, 10).__exit__(None, None, None)  # nothing buffered: no part
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("done"))
    stray = tmp_path / "part-00001.parquet.tmp"
    stray.write_bytes(b"PAR1 half a file")  # a part whose writer died before close: no footer
    assert read_ledger(tmp_path) == {"done"}
    assert not stray.exists()
    # numbering continues after existing parts, never overwriting one
    with PartWriter(tmp_path, 10, 10) as writer:
        writer.add(_rows("next"))
    assert [p.name for p in closed_parts(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]


def test_a_second_writer_on_the_same_run_is_refused(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another process"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()


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
