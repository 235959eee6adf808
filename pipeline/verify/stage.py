"""`distill verify`: judge every completion (verifier by domain) and apply DeepSeek-R1's quality filters.

    distill verify runs/demo                         # a run folder: raw/ -> verified/ (one part per raw part)
    distill verify recipes/demo.yaml verify.math.timeout_s=10
    distill verify --input gens.jsonl --output gens.verified.parquet     # any file with domain, reference, completion

Re-runnable without the teacher: a verified part is redone when the verify settings changed or when it holds
infrastructure errors (a broken sandbox or worker is never scored as a wrong answer: it is retried next run). A data
fault (a reference no verifier can read) is final: counted per reason, left out of training, never redone.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.executor import Executor, LocalExecutor, Shard, Worker
from pipeline.parts import shard_parts, update_stats, write_atomic_bytes, write_table_atomic
from pipeline.records import (
    DATA_FAULT,
    DOMAINS,
    FAILED,
    INFRA_ERROR,
    PASSED,
    THINK_CLOSE,
    THINK_OPEN,
    TOPK_COLUMNS,
    VERDICT_FIELDS,
    VERIFIED_SCHEMA,
    fingerprint,
    split_reasoning,
)
from pipeline.verify.config import VerifyConfig
from pipeline.verify.filters import FilterInput, apply_filters
from pipeline.verify.verifiers import VerifierSet
from pipeline.verify.verifiers.base import VerifyItem

# Bump when a verifier's logic changes, so that existing verdicts are recomputed.
VERIFIER_LOGIC_VERSION = 2  # 2: only the text after the think block is judged; gym scored with its task config


def verify_hash(cfg: VerifyConfig) -> str:
    """Settings that change verdicts; worker counts and `inline` do not."""
    settings = cfg.model_dump(exclude={"inline": True, "math": {"workers"}, "code": {"workers"}})
    return fingerprint({"settings": settings, "logic": VERIFIER_LOGIC_VERSION})


def verify_rows(rows: list[dict], verifiers: VerifierSet, cfg: VerifyConfig, vhash: str) -> list[dict]:
    """Rows in (with domain, reference, completion), the same rows out with verdict columns added."""
    by_domain: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        row["reasoning"], row["answer"] = _split(row)
        by_domain.setdefault(row["domain"], []).append(i)
    for domain, indices in by_domain.items():
        verifier = verifiers.get(domain)
        items = [VerifyItem(rows[i]["completion"], rows[i]["answer"], rows[i]["reference"] or "") for i in indices]
        for i, verdict in zip(indices, verifier.verify_batch(items), strict=True):
            rows[i].update(
                verifier=verifier.name,
                status=verdict.status,
                passed=verdict.passed,
                reason=verdict.reason,
                verdict_detail=json.dumps(verdict.detail, default=str),
            )
    for row in rows:
        signals = FilterInput(
            prompt=row.get("prompt") or "",
            completion=row["completion"],
            reasoning=row["reasoning"],
            answer=row["answer"],
            domain=row["domain"],
            finish_reason=row.get("finish_reason") or "",
            completion_tokens=row.get("completion_tokens"),
        )
        row["failed_filters"] = apply_filters(signals, cfg.filters)
        row["verify_hash"] = vhash
    return rows


def _split(row: dict) -> tuple[str, str]:
    """The completion's own tags decide, so rows split under an older rule are judged by today's; without tags the
    stored split stands (the engine's reasoning field or a template-opened block made it), else all is answer."""
    completion = row["completion"]
    if THINK_OPEN in completion or THINK_CLOSE in completion or not (row.get("answer") or row.get("reasoning")):
        return split_reasoning(completion)
    return row.get("reasoning") or "", row.get("answer") or ""


def _progress(total: int, quiet: bool) -> Progress:
    columns = [
        TextColumn("[bold]verify"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
    ]
    progress = Progress(*columns, disable=quiet)
    progress.add_task("verify", total=total)
    return progress


def _status_counts(rows: list[dict]) -> dict:
    """Rows by status, and the data faults by verifier:reason (each is a reference to fix in the source data)."""
    counts = Counter(r["status"] for r in rows)
    faults = Counter(f"{r['verifier']}:{r['reason']}" for r in rows if r["status"] == DATA_FAULT)
    return {
        "rows": len(rows),
        **{status: counts[status] for status in (PASSED, FAILED, INFRA_ERROR, DATA_FAULT)},
        "data_faults": dict(faults),
    }


def _warn_data_faults(counts: dict) -> None:
    """One line naming the data faults by reason, for the person who can fix the references."""
    if counts["data_fault"]:
        reasons = ", ".join(f"{reason} x{n}" for reason, n in sorted(counts["data_faults"].items()))
        print(
            f"distill verify: {counts['data_fault']} verdict(s) are data faults ({reasons}): references no verifier "
            "can read, left out of training and not verified again; fix them in the source data (rows with status "
            "data_fault)",
            file=sys.stderr,
        )


def _summarize(rows_done: list[dict], started: float) -> dict:
    elapsed = time.monotonic() - started
    filters = Counter(name for r in rows_done for name in r["failed_filters"])
    return {
        **_status_counts(rows_done),
        "reasons": dict(Counter(f"{r['verifier']}:{r['reason']}" for r in rows_done)),
        "failed_filters": dict(filters),
        "kept": sum(1 for r in rows_done if r["passed"] and not r["failed_filters"]),
        "by_domain": {
            d: {"rows": n, "passed": sum(1 for r in rows_done if r["domain"] == d and r["passed"])}
            for d, n in Counter(r["domain"] for r in rows_done).items()
        },
        "elapsed_s": elapsed,
        "rows_per_s": len(rows_done) / elapsed if elapsed else 0.0,
    }


def _needs_verify(raw_part: Path, out: Path, vhash: str) -> bool:
    if not out.exists():
        return True
    table = pq.read_table(out, columns=["verify_hash", "status"])
    hashes = set(table.column("verify_hash").to_pylist())
    return hashes != {vhash} or INFRA_ERROR in table.column("status").to_pylist()


@dataclass
class ShardVerdicts:
    """One shard's raw parts, how many it (re)verified, and a summary of each row it verified."""

    parts: list[Path]
    parts_verified: int
    rows: list[dict]


def verify_shard(run_dir: Path, cfg: VerifyConfig, shard: Shard, worker: Worker, quiet: bool = False) -> ShardVerdicts:
    """The raw parts `shard` owns -> verified parts of the same names, skipping those verified with these settings.
    The verifiers (their sandboxes and worker pools) are the worker's: started once, they serve its next shards."""
    vhash = verify_hash(cfg)
    raw_parts = shard_parts(run_dir / "raw", shard)
    out_dir = run_dir / "verified"
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [p for p in raw_parts if _needs_verify(p, out_dir / p.name, vhash)]
    total = sum(pq.read_metadata(p).num_rows for p in todo)
    verified: list[dict] = []
    if not todo:
        return ShardVerdicts(raw_parts, 0, [])
    verifiers = worker.keep(f"verifiers:{vhash}", partial(VerifierSet, cfg))
    with _progress(total, quiet) as progress:
        for part in todo:
            table = pq.read_table(part)
            # The teacher's top-k (sparse KD) is most of a part's bytes and no verifier reads it: it stays Arrow
            # (millions of floats per part as Python objects would be gigabytes) and is put back beside the verdicts.
            heavy = [c for c in TOPK_COLUMNS if c in table.column_names]
            rows = verify_rows(table.drop_columns(heavy).to_pylist(), verifiers, cfg, vhash)
            light = pa.schema([f for f in VERIFIED_SCHEMA if f.name not in heavy])
            verdicts = pa.Table.from_pylist(rows, schema=light)
            for name in heavy:
                verdicts = verdicts.append_column(VERIFIED_SCHEMA.field(name), table.column(name))
            write_table_atomic(verdicts.select(VERIFIED_SCHEMA.names), out_dir / part.name)
            verified.extend(
                {k: r[k] for k in ("status", "passed", "reason", "verifier", "failed_filters", "domain")} for r in rows
            )
            progress.advance(progress.task_ids[0], len(rows))
    return ShardVerdicts(raw_parts, len(todo), verified)


def verify_run(run_dir: Path, cfg: VerifyConfig, quiet: bool = False, executor: Executor | None = None) -> dict:
    """raw/part-N.parquet -> verified/part-N.parquet, skipping parts already verified with these settings; the
    shards run by `executor` (default: one shard, every part, in this process)."""
    started = time.monotonic()
    shards = (executor or LocalExecutor()).run(partial(verify_shard, run_dir, cfg, quiet=quiet))
    raw_parts = [p for s in shards for p in s.parts]
    columns = ["status", "verifier", "reason"]
    verified_dir = run_dir / "verified"
    everything = [r for p in raw_parts for r in pq.read_table(verified_dir / p.name, columns=columns).to_pylist()]
    stats = {
        "parts": len(raw_parts),
        "parts_verified": sum(s.parts_verified for s in shards),
        "verify_hash": verify_hash(cfg),
        **_summarize([r for s in shards for r in s.rows], started),
        "all_parts": _status_counts(everything),  # the whole of verified/, so a re-run that redoes nothing still tells
    }
    update_stats(run_dir, "verify", stats)
    _warn_data_faults(stats)
    return stats


def _read_input(path: Path, rejects: list[dict]) -> list[dict]:
    """Rows of a JSONL/Parquet file that can be verified; the others go to `rejects` with their line."""
    if path.suffix == ".parquet":
        raw_rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        raw_rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw_rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rejects.append({"file": str(path), "line": n, "reason": f"invalid JSON: {e}", "row": line[:2000]})
    rows = []
    for n, row in raw_rows:
        problem = _row_problem(row)
        if problem:
            rejects.append(
                {"file": str(path), "line": n, "reason": problem, "row": json.dumps(row, default=str)[:2000]}
            )
        else:
            if not isinstance(row["reference"], str):
                row["reference"] = json.dumps(row["reference"])
            rows.append(row)
    return rows


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "row is not a JSON object"
    missing = [k for k in ("domain", "reference", "completion") if row.get(k) is None]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if row["domain"] not in DOMAINS:
        return f"unknown domain {row['domain']!r}; expected one of {', '.join(DOMAINS)}"
    if not isinstance(row["completion"], str):
        return "completion is not a string"
    return None


def verify_file(input_path: Path, output_path: Path, cfg: VerifyConfig, quiet: bool = False) -> dict:
    """File mode: every input column is carried through; verdict columns are added; bad rows go to rejects."""
    started = time.monotonic()
    rejects: list[dict] = []
    rows = _read_input(input_path, rejects)
    vhash = verify_hash(cfg)
    with VerifierSet(cfg) as verifiers, _progress(len(rows), quiet) as progress:
        rows = verify_rows(rows, verifiers, cfg, vhash)
        progress.advance(progress.task_ids[0], len(rows))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    for field in VERDICT_FIELDS:  # typed even when every row has, say, an empty failed_filters list
        table = table.set_column(table.schema.get_field_index(field.name), field, table[field.name].cast(field.type))
    write_table_atomic(table, output_path)
    rejects_path = output_path.with_suffix(".rejects.jsonl")
    write_atomic_bytes(rejects_path, "".join(json.dumps(r) + "\n" for r in rejects).encode())
    stats = {"rejected_rows": len(rejects), "rejects_file": str(rejects_path), **_summarize(rows, started)}
    _warn_data_faults(stats)
    return stats
