import os
import time

import pyarrow.parquet as pq
import pytest

from pipeline.parts import PartWriter, RunLock, closed_parts, read_ledger


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
