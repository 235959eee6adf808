"""`distill build` carries sparse KD's columns (records.TOPK_FIELDS) into both splits, row for row, readable by
pyarrow and by Hugging Face `datasets`; rows (and whole parts written before the columns existed) without them get
nulls; the card states K and the bytes per token; row groups of such heavy rows are bounded by bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.build.stage as build_stage
from pipeline.build.config import BuildConfig
from pipeline.build.stage import build
from pipeline.parts import PartWriter
from pipeline.records import TOPK_COLUMNS, VERIFIED_SCHEMA, Col
from tests.pipeline.build.test_build import _row

K = 3
OLD_SCHEMA = pa.schema([f for f in VERIFIED_SCHEMA if f.name not in TOPK_COLUMNS])  # parts verified before


def _topk(p: int, i: int) -> dict:
    """Distinct values per sample, so a row that got another row's arrays fails the comparison."""
    rng = np.random.default_rng(1000 * p + i)
    tokens = int(rng.integers(5, 40))
    lps = -np.sort(rng.exponential(2.0, size=(tokens, K)), axis=1)
    return {
        Col.COMPLETION_TOKENS: tokens,
        Col.COMPLETION_TOKEN_IDS: rng.integers(0, 49152, size=tokens).astype(np.int32),
        Col.TOPK_TOKEN_IDS: rng.integers(0, 49152, size=tokens * K).astype(np.int32),
        Col.TOPK_LOGPROBS: lps.ravel().astype(np.float16),
        Col.TEACHER_TOPK: K,
    }


def _make_run(run_dir: Path) -> dict[tuple[str, int], dict]:
    """40 problems x 2 passing samples with top-k, then a part of 6 problems written without the columns."""
    expected = {}
    with PartWriter(run_dir / "verified", max_rows=20, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        for p in range(40):
            rows = []
            for i in range(2):
                arrays = _topk(p, i)
                rows.append(_row(f"p{p}", f"Problem {p}: what is {p} + {p * 3}? Answer with care.", i, True, 0.3))
                rows[-1] |= arrays
                expected[(f"p{p}", i)] = arrays
            writer.add(rows)
    old = [_row(f"old{p}", f"Old problem {p}: what is {p} times {p + 2}, exactly?", 0, True, 0.3) for p in range(6)]
    pq.write_table(pa.Table.from_pylist(old, schema=OLD_SCHEMA), run_dir / "verified" / "part-00099.parquet")
    (run_dir / "raw").mkdir(exist_ok=True)
    for part in (run_dir / "verified").glob("part-*.parquet"):
        (run_dir / "raw" / part.name).write_bytes(b"")  # only their names are checked against the verified ones
    return expected


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("topk") / "run"
    expected = _make_run(run_dir)
    cfg = BuildConfig(test_fraction=0.3, near_dup_threshold=None, shard_mb=0.02)
    stats = build(run_dir, cfg, base_dir=run_dir.parent, quiet=True)
    return run_dir / "dataset", stats, expected


def _shards(dataset_dir: Path) -> list[Path]:
    return sorted((dataset_dir / "data").glob("*.parquet"))


def test_both_splits_carry_each_rows_own_top_k_and_old_rows_get_nulls(built):
    dataset_dir, stats, expected = built
    table = pq.read_table(_shards(dataset_dir))
    assert table.schema.field(Col.TOPK_LOGPROBS).type == pa.list_(pa.float16())
    assert table.schema.field(Col.COMPLETION_TOKEN_IDS).type == pa.list_(pa.int32())
    assert stats["splits"]["train"] > 0 and stats["splits"]["test"] > 0
    rows = table.to_pylist()
    assert len(rows) == 40 * 2 + 6
    for row in rows:
        if row[Col.PROBLEM_ID].startswith("old"):
            assert all(row[c] is None for c in TOPK_COLUMNS)
            continue
        want = expected[(row[Col.PROBLEM_ID], row[Col.SAMPLE_INDEX])]
        assert row[Col.COMPLETION_TOKENS] == len(row[Col.COMPLETION_TOKEN_IDS])
        assert row[Col.COMPLETION_TOKEN_IDS] == want[Col.COMPLETION_TOKEN_IDS].tolist()
        assert row[Col.TOPK_TOKEN_IDS] == want[Col.TOPK_TOKEN_IDS].tolist()
        assert row[Col.TOPK_LOGPROBS] == want[Col.TOPK_LOGPROBS].astype(float).tolist()  # float16, exactly
        assert row[Col.TEACHER_TOPK] == K


def test_hugging_face_datasets_loads_the_columns(built, tmp_path, monkeypatch):
    dataset_dir, _, expected = built
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=str(dataset_dir / "data"), cache_dir=str(tmp_path / "cache"))
    train = loaded["train"]
    features = train.features
    assert features[Col.TOPK_LOGPROBS].feature.dtype == "float16"
    assert features[Col.TOPK_TOKEN_IDS].feature.dtype == "int32"
    assert features[Col.TEACHER_TOPK].dtype == "int32"
    row = next(r for r in train if r[Col.TEACHER_TOPK])
    want = expected[(row[Col.PROBLEM_ID], row[Col.SAMPLE_INDEX])]
    assert row[Col.TOPK_TOKEN_IDS] == want[Col.TOPK_TOKEN_IDS].tolist()
    np.testing.assert_array_equal(np.asarray(row[Col.TOPK_LOGPROBS]), want[Col.TOPK_LOGPROBS].astype(np.float32))
    as_torch = train.with_format("torch")[0]
    assert as_torch[Col.TOPK_LOGPROBS].dtype.is_floating_point


def test_stats_and_card_state_k_and_the_bytes_per_token(built):
    dataset_dir, stats, expected = built
    topk = stats["teacher_topk"]
    tokens = sum(len(a[Col.COMPLETION_TOKEN_IDS]) for a in expected.values())
    assert (topk["k"], topk["rows"], topk["tokens"]) == ([K], 80, tokens)
    assert topk["bytes_per_token"] == pytest.approx(topk["bytes"] / tokens)
    # K = 3: 4 + 3 x (4 + 2) = 22 bytes per token uncompressed; random ids and logprobs barely compress
    assert 10 < topk["bytes_per_token"] < 30
    card = (dataset_dir / "README.md").read_text()
    assert "K = 3" in card and f"{topk['bytes_per_token']:.1f} bytes per completion token" in card


def test_a_build_without_top_k_says_nothing_of_it(tmp_path):
    run_dir = tmp_path / "run"
    rows = [_row(f"q{p}", f"Question {p}: what is {p} + 1, exactly?", 0, True, 0.3) for p in range(5)]
    with PartWriter(run_dir / "verified", max_rows=20, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        writer.add(rows)
    (run_dir / "raw").mkdir()
    (run_dir / "raw" / "part-00000.parquet").write_bytes(b"")
    stats = build(run_dir, BuildConfig(near_dup_threshold=None), base_dir=tmp_path, quiet=True)
    assert stats["teacher_topk"] is None
    assert "sparse distillation" not in (run_dir / "dataset" / "README.md").read_text()


def test_row_groups_are_bounded_by_bytes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    monkeypatch.setattr(build_stage, "GROUP_BYTES", 1)  # every row is over it: one row per group
    build(run_dir, BuildConfig(near_dup_threshold=None, shard_mb=100), base_dir=tmp_path, quiet=True)
    (shard,) = _shards(run_dir / "dataset")
    meta = pq.read_metadata(shard)
    assert meta.num_row_groups == meta.num_rows == 86
