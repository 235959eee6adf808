"""`distill build`: verified parts -> a training set in the Hugging Face folder layout, with card and manifest.

    distill build runs/demo      # writes runs/demo/dataset/: data/train-*.parquet, README.md, manifest.json
    distill build recipes/demo.yaml build.pass_rate_band=[0.2,0.8] build.stratify.enabled=true

Memory stays bounded whatever the number of rows: pass 1 streams the verified parts one at a time through the
selection (`selection.py`) into spill files, keeping per kept row only a sort key, its weight and where it
lies; pass 2 routes rows into rank-range buckets of about 64 MB and writes the shards from them in order
(`shards.py`), normalizing the weight to mean 1 on the way. Same inputs and seed, same dataset.

Sparse KD's columns (records.TOPK_FIELDS: the teacher's token ids and top-k, tens of values per token) never become
Python objects: the selection sees each part without them, and the kept rows get them back as Arrow columns taken
by position, so a part costs its Arrow bytes, not ~60 bytes per value. Row groups are sized by bytes as well as rows.

Every raw part must have a verified part judged under the build's verify settings: a `--no-verify` generate or an
interrupted verify would otherwise leave problems out silently, and verdicts of old settings would mix in.
The train/test split is decided per problem before selection, by a hash of its id: `test_problems.parquet` holds
every test problem, solved by the teacher or not, so an evaluation on it is not limited to what the teacher solved;
the `test` split holds the kept rows of those problems.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import track

from pipeline.build.card import render_card
from pipeline.build.config import BuildConfig
from pipeline.build.selection import Selector, category
from pipeline.build.shards import TEST_PROBLEMS, ShardWriter, file_entry, plan_shards, write_manifest
from pipeline.build.weighting import pass_rate
from pipeline.parts import _fsync_dir, closed_parts, update_stats, write_atomic_bytes
from pipeline.records import (
    DATASET_SCHEMA,
    FAILED,
    PASSED,
    TEST_PROBLEMS_SCHEMA,
    TOPK_COLUMNS,
    Col,
    fingerprint,
)

BUCKET_BYTES = 64 * 2**20  # rows of one rank range, sorted in memory before they go to the shard writer
GROUP_BYTES = 256 * 2**20  # a row group's size in memory at most (rows with top-k logprobs are ~1 MB each)
GROUP_ROWS = 10_000
FLUSH_BYTES = 64 * 2**20  # rows routed to buckets are buffered up to this much before being written
_EXCLUSION_SCHEMA = pa.schema(
    [(Col.PROBLEM_ID, pa.string()), (Col.SAMPLE_INDEX, pa.int32()), (Col.REASON, pa.string())]
)
_SHOWN = 10  # part names listed in an error before "and N more"


def _hash64(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def is_test(cfg: BuildConfig, problem_id: str) -> bool:
    """The split of a problem, from its id alone: fixed before selection, whatever its samples' verdicts."""
    return _hash64("split", cfg.seed, problem_id) / 2**64 < cfg.test_fraction


def _names(parts: list[Path]) -> str:
    more = f" and {len(parts) - _SHOWN} more" if len(parts) > _SHOWN else ""
    return ", ".join(p.name for p in parts[:_SHOWN]) + more


def verified_parts(run_dir: Path, verify_hash: str | None) -> list[Path]:
    """The verified parts, once each raw part has one judged under `verify_hash` (None: one hash shared by all).

    Refuses, naming the parts, rather than building from a partial or mixed `verified/`.
    """
    parts = closed_parts(run_dir / "verified")
    if not parts:
        raise RuntimeError(f"no verified parts in {run_dir / 'verified'}: run `distill verify {run_dir}` first")
    names = {p.name for p in parts}
    unverified = [p for p in closed_parts(run_dir / "raw") if p.name not in names]
    if unverified:
        raise RuntimeError(
            f"{len(unverified)} raw part(s) of {run_dir} have no verified part ({_names(unverified)}; after "
            f"`--no-verify` or an interrupted verify): run `distill verify {run_dir}` first"
        )
    hashes = {p: set(pq.read_table(p, columns=[Col.VERIFY_HASH]).column(Col.VERIFY_HASH).to_pylist()) for p in parts}
    expected = {verify_hash} if verify_hash is not None else set().union(*hashes.values())
    if len(expected) > 1 or any(h != expected for h in hashes.values()):
        stale = [p for p, h in hashes.items() if h != {verify_hash}] if verify_hash is not None else parts
        wanted = f"this build's verify settings (hash {verify_hash})" if verify_hash is not None else "one another"
        raise RuntimeError(
            f"{len(stale)} verified part(s) of {run_dir} were judged under verify settings other than {wanted} "
            f"({_names(stale)}): run `distill verify {run_dir}` with the same verify.* settings as the build first"
        )
    return parts


def _previous(final: Path) -> Path:
    return final.with_name(final.name + ".previous")


def _recover(final: Path) -> None:
    """Finish a swap a crash interrupted: the old dataset goes back to its name if the new one never got there."""
    previous = _previous(final)
    if previous.exists() and not final.exists():
        os.replace(previous, final)
    shutil.rmtree(previous, ignore_errors=True)


def _swap_in(new: Path, final: Path) -> None:
    """Old dataset aside, new one in, old one deleted: at every moment a complete dataset is on disk, and a failed
    rename puts the old one back (a crash between the renames is undone by `_recover` on the next build)."""
    previous = _previous(final)
    if final.exists():
        os.replace(final, previous)
    try:
        os.replace(new, final)
    except BaseException:
        if previous.exists():
            os.replace(previous, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


_PROBLEM_COLUMNS = (Col.PROBLEM_ID, Col.SOURCE, Col.DOMAIN, Col.PROMPT, Col.REFERENCE, Col.METADATA)


def _test_problems(rows: list[dict], cfg: BuildConfig, seen: set[str]) -> list[dict]:
    """One record per test problem of these rows not seen before (a problem's samples share a part)."""
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        if r[Col.PROBLEM_ID] not in seen and is_test(cfg, r[Col.PROBLEM_ID]):
            by_problem.setdefault(r[Col.PROBLEM_ID], []).append(r)
    records = []
    for pid, samples in by_problem.items():
        seen.add(pid)
        first = samples[0]
        records.append(
            {
                **{k: first[k] for k in _PROBLEM_COLUMNS},
                Col.SAMPLES: len(samples),
                Col.TEACHER_PASS_RATE: pass_rate([s[Col.STATUS] for s in samples]),
            }
        )
    return records


class _Kept:
    """Per kept row: order key, split, stratum category, weight and location; numpy arrays, not Python objects."""

    def __init__(self) -> None:
        self.columns: dict[str, list[np.ndarray]] = {k: [] for k in ("key", "test", "cat", Col.WEIGHT, "spill", "row")}
        self.categories: dict[str, int] = {}

    def add(self, spill: int, rows: list[dict], cfg: BuildConfig) -> None:
        n = len(rows)
        keys = [_hash64(cfg.seed, r[Col.PROBLEM_ID], r[Col.SAMPLE_INDEX]) for r in rows]
        test = [is_test(cfg, r[Col.PROBLEM_ID]) for r in rows]
        cats = [self.categories.setdefault(r["_category"], len(self.categories)) for r in rows]
        weights = [r[Col.WEIGHT] for r in rows]
        for name, values in (("key", keys), ("test", test), ("cat", cats), (Col.WEIGHT, weights)):
            self.columns[name].append(np.asarray(values, dtype={"key": np.uint64, "test": bool}.get(name)))
        self.columns["spill"].append(np.full(n, spill, dtype=np.int32))
        self.columns["row"].append(np.arange(n, dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in self.columns.items()}


def _stratify(arrays: dict[str, np.ndarray], fractions: list[float], drops: Counter) -> np.ndarray:
    """Mask of rows kept by head/torso/tail mixing: categories ranked by frequency into thirds, then each stratum
    cut so the mix follows `fractions`; within a stratum the rows with the smallest keys stay (seeded, stable)."""
    cats, counts = np.unique(arrays["cat"], return_counts=True)
    order = cats[np.argsort(-counts, kind="stable")]
    stratum_of = {int(c): min(2, i * 3 // max(1, len(order))) for i, c in enumerate(order)}
    strata = np.array([stratum_of[int(c)] for c in arrays["cat"]], dtype=np.int8)
    sizes = [int((strata == s).sum()) for s in range(3)]
    total = min((sizes[s] / f for s, f in enumerate(fractions) if f > 0), default=0)
    keep = np.zeros(len(strata), dtype=bool)
    for s, f in enumerate(fractions):
        members = np.flatnonzero(strata == s)
        quota = min(len(members), round(total * f))
        keep[members[np.argsort(arrays["key"][members], kind="stable")[:quota]]] = True
    drops["stratify_cap"] += int((~keep).sum())
    return keep


def _write_split(out: Path, work: Path, split: str, idx: np.ndarray, arrays, spills, mean_w, cfg) -> list[dict]:
    """Shards of one split: rows routed into rank-range buckets, each bucket sorted and streamed to the writer."""
    idx = idx[np.argsort(arrays["key"][idx], kind="stable")]
    # Spills are zstd Parquet like the shards, so their size estimates the split's size on disk; in memory a row
    # takes a few times more, hence the factor for the buckets.
    total_bytes = sum(p.stat().st_size for p in spills) * len(idx) / max(1, len(arrays["key"]))
    row_bytes = total_bytes * 3 / max(1, len(idx))  # in memory, as for the buckets
    group_rows = max(1, min(GROUP_ROWS, int(GROUP_BYTES // max(1.0, row_bytes))))
    plan = plan_shards(len(idx), int(total_bytes), cfg.shard_mb)
    writer = ShardWriter(out, split, DATASET_SCHEMA, plan, group_rows=group_rows)
    n_buckets = max(1, math.ceil(total_bytes * 3 / BUCKET_BYTES))
    rank = np.full(len(arrays["key"]), -1, dtype=np.int64)
    rank[idx] = np.arange(len(idx))
    bucket_writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[pa.Table]] = {}

    def flush() -> None:
        # Buffered, because one row group per spill and bucket would keep millions of row-group footers in memory.
        for b, tables in buffers.items():
            part = pa.concat_tables(tables)
            if b not in bucket_writers:
                bucket_writers[b] = pq.ParquetWriter(work / f"bucket-{split}-{b:05d}.parquet", part.schema)
            bucket_writers[b].write_table(part)
        buffers.clear()

    offsets = np.cumsum([0] + [pq.read_metadata(p).num_rows for p in spills])
    buffered = 0
    for s, spill in enumerate(spills):
        table = pq.read_table(spill)
        ranks = rank[offsets[s] : offsets[s + 1]]
        table = table.append_column("_rank", pa.array(ranks))
        buckets = np.where(ranks >= 0, ranks * n_buckets // max(1, len(idx)), -1)
        for b in np.unique(buckets[buckets >= 0]):
            part = table.filter(pa.array(buckets == b))
            buffers.setdefault(int(b), []).append(part)
            buffered += part.nbytes
        if buffered > FLUSH_BYTES:
            flush()
            buffered = 0
    flush()
    for w in bucket_writers.values():
        w.close()
    for b in sorted(bucket_writers):
        table = pq.read_table(work / f"bucket-{split}-{b:05d}.parquet")
        table = table.take(pc.sort_indices(table, [("_rank", "ascending")])).drop_columns(["_rank"])
        weights = pc.divide(table[Col.WEIGHT], mean_w) if mean_w > 0 else pa.array(np.ones(len(table)))
        table = table.set_column(table.schema.get_field_index(Col.WEIGHT), Col.WEIGHT, weights)
        writer.write(table.cast(DATASET_SCHEMA))
    if len(idx) == 0:
        writer.write(DATASET_SCHEMA.empty_table())
    return writer.close()


def _with_topk(selected: pa.Table, rows: list[dict], heavy: pa.Table, part: Path) -> pa.Table:
    """The kept rows with their sparse KD columns, taken by position from the part's own Arrow columns (a sample
    is its (problem_id, sample_index), unique within a part); null columns where the part has none."""
    if not heavy.num_columns or not selected.num_rows:
        return selected
    position: dict[tuple[str, int], int] = {}
    for i, r in enumerate(rows):
        key = (r[Col.PROBLEM_ID], r[Col.SAMPLE_INDEX])
        if key in position:
            raise RuntimeError(f"{part}: sample {key[1]} of problem {key[0]} appears twice")
        position[key] = i
    ids = selected[Col.PROBLEM_ID].to_pylist()
    samples = selected[Col.SAMPLE_INDEX].to_pylist()
    taken = heavy.take(pa.array([position[k] for k in zip(ids, samples, strict=True)], pa.int64()))
    for name in heavy.column_names:
        field = selected.schema.field(index := selected.schema.get_field_index(name))
        selected = selected.set_column(index, field, taken[name].cast(field.type))
    return selected


def _topk_stats(shards: list[Path]) -> dict | None:
    """K and the on-disk cost of sparse KD's columns in the written shards (compressed column chunks, from the
    Parquet footers) per completion token of the rows that carry them; None when no row does."""
    if not shards or Col.TEACHER_TOPK not in pq.read_schema(shards[0]).names:
        return None
    table = pq.read_table(shards, columns=[Col.TEACHER_TOPK, Col.COMPLETION_TOKEN_IDS])
    ks = table[Col.TEACHER_TOPK].to_numpy(zero_copy_only=False)
    with_topk = ~np.isnan(ks.astype(float))
    if not with_topk.any():
        return None
    tokens = int(pc.sum(pc.list_value_length(table[Col.COMPLETION_TOKEN_IDS])).as_py() or 0)
    stored = 0
    for shard in shards:
        meta = pq.read_metadata(shard)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in TOPK_COLUMNS:
                    stored += column.total_compressed_size
    return {
        "k": sorted({int(k) for k in ks[with_topk]}),
        "rows": int(with_topk.sum()),
        "tokens": tokens,
        "bytes": stored,
        "bytes_per_token": stored / tokens if tokens else 0.0,
    }


def _known(values: np.ndarray) -> np.ndarray:
    """Values a server reported: a null (no usage figures from the endpoint) reads as NaN and is left out."""
    values = values.astype(float)
    return values[np.isfinite(values)]


def _summary(values: np.ndarray) -> dict:
    values = _known(values)
    if len(values) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def _histogram(values: np.ndarray, bins: int = 30) -> dict:
    values = _known(values)
    counts, edges = np.histogram(values, bins=bins) if len(values) else (np.zeros(0), np.zeros(1))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _splits(entries: list[dict]) -> list[str]:
    return list(dict.fromkeys(e["split"] for e in entries))


def _dataset_stats(out: Path, entries: list[dict], rows_in: int, drops: Counter, judged: dict) -> dict:
    """Figures for the card, read back from the written shards (a column at a time) so they describe the files."""
    shards = [out / e["file"] for e in entries]
    columns = [Col.COMPLETION_TOKENS, Col.PROMPT_TOKENS, Col.WEIGHT]
    table = pq.read_table(shards, columns=columns) if shards else None
    col = {k: table[k].to_numpy(zero_copy_only=False) if table else np.zeros(0) for k in columns}
    rate = {kind: {k: v[0] / v[1] for k, v in judged[kind].items() if v[1]} for kind in judged}
    return {
        "rows_in": rows_in,
        "kept": sum(e["rows"] for e in entries),
        "dropped": dict(drops),
        "splits": {split: sum(e["rows"] for e in entries if e["split"] == split) for split in _splits(entries)},
        "pass_rate_by_source": rate[Col.SOURCE],
        "pass_rate_by_domain": rate[Col.DOMAIN],
        "tokens": {k: _summary(col[k]) for k in (Col.COMPLETION_TOKENS, Col.PROMPT_TOKENS)},
        "histograms": {k: _histogram(col[k]) for k in (Col.COMPLETION_TOKENS, Col.WEIGHT)},
        "teacher_topk": _topk_stats(shards),  # not a column: the stats of the top-k columns
    }


def build(
    run_dir: Path,
    cfg: BuildConfig,
    base_dir: Path,
    recipe_yaml: str = "",
    quiet: bool = False,
    verify_hash: str | None = None,
) -> dict:
    """Build RUN/dataset/ from RUN/verified/; returns the stats also written to the dataset and stats.json.

    `verify_hash` is the fingerprint of the recipe's verify settings (`pipeline.verify.stage.verify_hash`): every
    part must have been judged under it. None, for verified parts made without a recipe, asks only that they agree.
    """
    started = time.monotonic()
    # Built beside the previous dataset and swapped in at the end: a failed build leaves the old one intact.
    final, out = run_dir / "dataset", run_dir / "dataset.partial"
    _recover(final)
    parts = verified_parts(run_dir, verify_hash)
    work = out / ".build"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True)
    selector = Selector(cfg, base_dir)
    kept = _Kept()
    spills: list[Path] = []
    rows_in = 0
    teachers: set[str] = set()
    judged: dict[str, dict[str, list[int]]] = {Col.SOURCE: {}, Col.DOMAIN: {}}  # column -> value -> [passed, judged]
    exclusions = pq.ParquetWriter(work / "exclusions.parquet", _EXCLUSION_SCHEMA)
    test_problems = pq.ParquetWriter(work / TEST_PROBLEMS, TEST_PROBLEMS_SCHEMA) if cfg.test_fraction else None
    test_seen: set[str] = set()
    for i, part in enumerate(track(parts, description="build", disable=quiet)):
        table = pq.read_table(part)
        heavy = table.select([c for c in TOPK_COLUMNS if c in table.column_names])
        rows = table.drop_columns(heavy.column_names).to_pylist()
        del table
        rows_in += len(rows)
        if test_problems:  # before selection: a test problem is one whatever its samples' verdicts
            records = _test_problems(rows, cfg, test_seen)
            test_problems.write_table(pa.Table.from_pylist(records, schema=TEST_PROBLEMS_SCHEMA))
        teachers.update(r[Col.TEACHER] for r in rows)
        for r in rows:
            for kind in judged:
                tally = judged[kind].setdefault(r[kind], [0, 0])
                tally[0] += r[Col.STATUS] == PASSED
                tally[1] += r[Col.STATUS] in (PASSED, FAILED)  # infra errors and data faults judged nothing
        selected, dropped = [], []
        for row, reason in selector.select(rows):
            if reason is None:
                selected.append(row)
            else:
                dropped.append({k: row[k] for k in (Col.PROBLEM_ID, Col.SAMPLE_INDEX)} | {Col.REASON: reason})
        exclusions.write_table(pa.Table.from_pylist(dropped, schema=_EXCLUSION_SCHEMA))
        categories = {r[Col.PROBLEM_ID]: category(r) for r in rows}
        kept.add(i, [r | {"_category": categories[r[Col.PROBLEM_ID]]} for r in selected], cfg)
        spill = work / f"spill-{i:05d}.parquet"
        spilled = _with_topk(pa.Table.from_pylist(selected, schema=DATASET_SCHEMA), rows, heavy, part)
        pq.write_table(spilled, spill, compression="zstd")
        spills.append(spill)
    exclusions.close()
    extra: dict = {"seed": cfg.seed}
    if test_problems:
        test_problems.close()
        os.replace(work / TEST_PROBLEMS, out / TEST_PROBLEMS)
        extra["test_problems"] = file_entry(out, TEST_PROBLEMS, len(test_seen))
    drops = selector.drops
    arrays = kept.arrays()
    mask = (
        _stratify(arrays, cfg.stratify.fractions, drops) if cfg.stratify.enabled else np.ones(len(arrays["key"]), bool)
    )
    mean_w = float(arrays[Col.WEIGHT][mask].mean()) if mask.any() else 0.0
    entries = []
    for split, is_test in (("train", False), ("test", True)):
        idx = np.flatnonzero(mask & (arrays["test"].astype(bool) == is_test))
        if split == "train" or len(idx):
            entries += _write_split(out, work, split, idx, arrays, spills, mean_w, cfg)
    shutil.move(work / "exclusions.parquet", run_dir / "build_exclusions.parquet")
    stats = {
        "name": run_dir.name,
        "license": cfg.license,
        "recipe_hash": fingerprint(recipe_yaml),
        "teacher": ", ".join(sorted(teachers)),  # not a column: the teachers of all rows
        "domains": sorted(judged[Col.DOMAIN]),
        **_dataset_stats(out, entries, rows_in, drops, judged),
        "decontamination": {
            Path(p).stem: {
                "removed": drops.get(f"contaminated:{Path(p).stem}", 0),
                "n": cfg.decontamination.n,
                "source": p,  # not a column: the eval set's path
            }
            for p in cfg.decontamination.eval_sets
        },
        "test_problems": len(test_seen),
        "elapsed_s": time.monotonic() - started,
    }
    stats["rows_per_s"] = rows_in / stats["elapsed_s"]
    assert stats["kept"] + sum(drops.values()) == rows_in, "every row is kept or dropped with a reason"
    write_atomic_bytes(out / "stats.json", json.dumps(stats, indent=2).encode())
    render_card(out, stats, recipe_yaml)
    write_manifest(out, entries, stats["recipe_hash"], extra=extra)  # last: its presence means done
    shutil.rmtree(work)
    _swap_in(out, final)
    update_stats(run_dir, "build", {k: v for k, v in stats.items() if k != "histograms"})
    return stats
