import gc
import hashlib
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.build.shards import ShardWriter, check_dataset, plan_shards, shard_name, write_manifest

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])
TOTAL = 10_001


def _batch(start: int, n: int) -> pa.RecordBatch:
    ids = list(range(start, start + n))
    return pa.RecordBatch.from_pydict({"id": ids, "text": [f"row {i} " * 3 for i in ids]}, schema=SCHEMA)


def _feed(writer: ShardWriter, total: int, sizes=(1, 7, 333, 2, 1000, 4096, 50)) -> None:
    start, k = 0, 0
    while start < total:
        n = min(sizes[k % len(sizes)], total - start)
        batch = _batch(start, n)
        writer.write(batch if k % 2 else pa.Table.from_batches([batch]))
        start, k = start + n, k + 1


def _build(dataset_dir, row_counts=(2501, 2500, 2500, 2500)) -> list[dict]:
    writer = ShardWriter(dataset_dir, "train", SCHEMA, list(row_counts), group_rows=1000)
    _feed(writer, sum(row_counts))
    entries = writer.close()
    write_manifest(dataset_dir, entries, recipe_hash="abc123", extra={"teacher": "t"})
    return entries


def test_plan_shards_is_balanced_and_sums():
    assert plan_shards(TOTAL, int(3.5 * 2**20), 1.0) == [2501, 2500, 2500, 2500]
    assert plan_shards(100, 10, 256) == [100]  # small: one shard
    assert plan_shards(100, 0, 256) == [100]
    assert plan_shards(3, 10 * 2**30, 1.0) == [1, 1, 1]  # never an empty shard for lack of rows
    assert plan_shards(0, 0, 256) == [0]  # one empty shard keeps the split loadable
    big = plan_shards(1_234_567, 50 * 2**30, 256)
    assert len(big) == 200 and sum(big) == 1_234_567 and max(big) - min(big) <= 1
    assert len(plan_shards(1000, 2**20, 0.5)) == 2 and len(plan_shards(1000, 2**20 + 1, 0.5)) == 3
    for bad in [(-1, 0, 1), (1, -1, 1), (1, 1, 0)]:
        with pytest.raises(ValueError):
            plan_shards(*bad)


def test_shard_name():
    assert shard_name("train", 2, 4) == "data/train-00002-of-00004.parquet"
    with pytest.raises(ValueError):
        shard_name("train/x", 0, 1)
    with pytest.raises(ValueError):
        shard_name("train", 4, 4)


def test_shards_split_rows_in_order_with_zstd_and_a_true_manifest(tmp_path):
    entries = _build(tmp_path)
    names = [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert [e["file"] for e in entries] == names
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "data").iterdir()) == names
    ids = []
    for entry in entries:
        path = tmp_path / entry["file"]
        meta = pq.read_metadata(path)
        assert meta.num_rows == entry["rows"]
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert groups[:-1] == [1000] * (len(groups) - 1) and groups[-1] <= 1000  # batch sizes don't leak through
        assert {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups) for c in range(2)} == {
            "ZSTD"
        }
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        ids += pq.read_table(path).column("id").to_pylist()
    assert [e["rows"] for e in entries] == [2501, 2500, 2500, 2500]
    assert ids == list(range(TOTAL))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe_hash"] == "abc123" and manifest["teacher"] == "t" and manifest["shards"] == entries
    assert "id: int64" in manifest["schema"]
    assert check_dataset(tmp_path) == []


def test_output_loads_with_datasets_and_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dataset_dir = tmp_path / "ds"
    _build(dataset_dir)
    loaded = datasets.load_dataset("parquet", data_dir=str(dataset_dir), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["train"]
    assert loaded["train"].num_rows == TOTAL
    assert loaded["train"][TOTAL - 1]["id"] == TOTAL - 1
    table = pads.dataset(dataset_dir / "data").to_table()
    assert table.num_rows == TOTAL and sorted(table.column("id").to_pylist()) == list(range(TOTAL))


def _damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-5])


def _damage_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (_damage_truncate, "bytes, manifest says"),
        (_damage_flip, "sha256"),
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.with_name("train-00009-of-00010.parquet").write_bytes(p.read_bytes()), "not listed"),
    ],
    ids=["truncated", "flipped", "deleted", "stray"],
)
def test_check_dataset_names_the_damaged_shard(tmp_path, damage, expect):
    _build(tmp_path)
    damage(tmp_path / "data/train-00001-of-00004.parquet")
    problems = check_dataset(tmp_path)
    assert problems
    shard = "train-00009-of-00010" if expect == "not listed" else "train-00001-of-00004"
    assert any(shard in p and expect in p for p in problems), problems
    assert all(shard in p for p in problems), problems


def test_truncation_is_also_an_unreadable_footer(tmp_path):
    _build(tmp_path)
    _damage_truncate(tmp_path / "data/train-00003-of-00004.parquet")
    assert any("footer" in p for p in check_dataset(tmp_path))


def test_check_dataset_reports_a_malformed_manifest(tmp_path):
    _build(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"file": "x"}]}))
    assert ["manifest.json" in p for p in check_dataset(tmp_path)] == [True]


def test_check_dataset_without_manifest_is_an_unfinished_build(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [10])
    _feed(writer, 10)
    writer.close()
    assert ["manifest" in p and "unfinished" in p for p in check_dataset(tmp_path)] == [True]


def test_too_few_rows_raise_on_close_and_leave_no_final_partial_shard(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [2501, 2500, 2500, 2500], group_rows=1000)
    _feed(writer, 6000)
    with pytest.raises(ValueError, match=r"'train'.*10001.*6000"):
        writer.close()
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == ["train-00000-of-00004.parquet", "train-00001-of-00004.parquet"]  # complete ones only
    assert [pq.read_metadata(tmp_path / "data" / f).num_rows for f in files] == [2501, 2500]


def test_too_many_rows_raise(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [5, 5])
    writer.write(_batch(0, 8))
    with pytest.raises(ValueError, match=r"'train'.*10.*12"):
        writer.write(_batch(8, 4))


def test_killed_writer_leaves_only_tmp_for_the_unfinished_shard(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [2501, 2500, 2500, 2500], group_rows=1000)
    _feed(writer, 5000)  # shard 0 complete, shard 1 half written
    del writer
    gc.collect()
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == [
        "train-00000-of-00004.parquet",
        "train-00001-of-00004.parquet.tmp",
    ]
    assert pq.read_metadata(data / "train-00000-of-00004.parquet").num_rows == 2501
    assert not (tmp_path / "manifest.json").exists()


def test_killed_writer_within_the_first_shard_leaves_only_tmp(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [3000], group_rows=1000)
    _feed(writer, 1500)
    del writer
    gc.collect()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["train-00000-of-00001.parquet.tmp"]


def test_zero_rows_give_one_empty_loadable_shard(tmp_path):
    writer = ShardWriter(tmp_path, "test", SCHEMA, plan_shards(0, 0, 256))
    entries = writer.close()
    write_manifest(tmp_path, entries, recipe_hash="r")
    assert [(e["file"], e["rows"]) for e in entries] == [("data/test-00000-of-00001.parquet", 0)]
    assert pq.read_schema(tmp_path / entries[0]["file"]).names == ["id", "text"]
    assert check_dataset(tmp_path) == []


def test_train_and_test_splits_share_a_manifest(tmp_path):
    train = ShardWriter(tmp_path, "train", SCHEMA, [3, 2])
    train.write(_batch(0, 5))
    test = ShardWriter(tmp_path, "test", SCHEMA, [2])
    test.write(_batch(5, 2))
    write_manifest(tmp_path, train.close() + test.close(), recipe_hash="r")
    assert check_dataset(tmp_path) == []


def test_mismatched_schema_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, "train", SCHEMA, [2])
    with pytest.raises(ValueError, match="schema"):
        writer.write(pa.table({"other": [1, 2]}))
