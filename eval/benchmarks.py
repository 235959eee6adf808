"""Benchmarks: names on the command line -> problem sets frozen as JSONL files that every model answers.

Freezing the problems once per evaluation (OUTPUT/benchmarks/NAME.jsonl) makes the comparison fair by construction:
the teacher and each student read the same file, and the file is the record of what was measured. Sources are the
generate stage's own (pipeline.generate.sources), so a benchmark renders with the same prompt templates the student was
trained on, and is scored by the same verifiers.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from eval.config import EVAL_GYM_SEED, EvalConfig
from pipeline.build.shards import TEST_PROBLEMS
from pipeline.generate.config import FileSource, GymSource, HFSource, HumanEvalSource, SourceConfig
from pipeline.generate.sources import Reject, iter_problems
from pipeline.parts import write_atomic_bytes
from pipeline.records import Col, Problem


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path  # the frozen problems
    problems: int
    excluded_as_training: int  # problems dropped because their prompt is in a training set


def resolve(spec: str | SourceConfig, cfg: EvalConfig) -> tuple[str, SourceConfig | list[Problem]]:
    """A benchmark's name and where its problems come from."""
    if not isinstance(spec, str):
        if isinstance(spec, GymSource):
            return spec.name, spec
        name = spec.name or Path(spec.path).stem
        return name, spec
    if spec == "humaneval":
        return spec, HumanEvalSource(limit=cfg.limit)
    if spec.startswith("gym:"):
        task = spec.removeprefix("gym:")
        return f"gym-{task}", GymSource(tasks=[task], size=cfg.limit or cfg.gym_size, seed=EVAL_GYM_SEED, name="gym")
    path = Path(spec)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return path.stem, FileSource(path=str(path.resolve()), limit=cfg.limit)
    if (path / "manifest.json").exists():
        return f"{path.resolve().parent.name}-test", dataset_test_problems(path)
    if path.is_dir():
        return path.name, HFSource(path=str(path.resolve()), split="test", limit=cfg.limit)
    raise FileNotFoundError(f"benchmark {spec!r}: not humaneval, gym:TASK, a .jsonl/.parquet file or a dataset folder")


def _split_rows(dataset: Path, split: str, columns: list[str], missing: str) -> list[dict]:
    """Rows of one split of a `distill build` folder (its data/SPLIT-*.parquet shards)."""
    files = sorted((Path(dataset) / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(missing)
    return pads.dataset(files).to_table(columns=columns).to_pylist()


def dataset_test_problems(dataset: Path) -> list[Problem]:
    """Every test problem of a `distill build` dataset, those the teacher never solved included.

    The build assigns problems to the test split before selection and lists them all in test_problems.parquet; the
    test split's rows hold only the solved ones, so reading problems from them would flatter the teacher.
    """
    path = Path(dataset) / TEST_PROBLEMS
    if not path.exists():
        has_split = any((Path(dataset) / "data").glob("test-*.parquet"))
        raise FileNotFoundError(
            f"dataset {dataset} has no {TEST_PROBLEMS}: "
            + (
                "it was built before the build listed its unsolved test problems; rebuild it with `distill build`"
                if has_split
                else "it has no test split (build it with build.test_fraction > 0)"
            )
        )
    problems = []
    for r in pq.read_table(path).to_pylist():
        metadata = json.loads(r[Col.METADATA] or "{}")
        problems.append(
            Problem(r[Col.PROBLEM_ID], r[Col.SOURCE], r[Col.DOMAIN], r[Col.PROMPT], r[Col.REFERENCE] or "", metadata)
        )
    return problems


def _training_prompt_key(prompt: str) -> str:
    """How a benchmark prompt is matched against training prompts: only case and spacing are folded, so a problem
    is left out only when the student trained on it verbatim (n-gram overlap is the build's decontamination's job)."""
    return re.sub(r"\s+", " ", prompt).strip().lower()


def training_prompts(datasets: list[str]) -> set[str]:
    """Normalized prompts of the train split of each dataset folder."""
    prompts: set[str] = set()
    for folder in datasets:
        missing = f"exclude_prompts_from: {folder} has no data/train-*.parquet"
        rows = _split_rows(folder, "train", [Col.PROMPT], missing)
        prompts.update(_training_prompt_key(row[Col.PROMPT]) for row in rows)
    return prompts


def freeze(cfg: EvalConfig, folder: Path) -> tuple[list[Benchmark], list[Reject]]:
    """Write each benchmark's problems to FOLDER/NAME.jsonl (without training prompts); rows left out go back."""
    exclude = training_prompts(cfg.exclude_prompts_from)
    benchmarks: list[Benchmark] = []
    rejects: list[Reject] = []
    seen: dict[str, tuple[str, int]] = {}  # problem ids are unique across benchmarks: rows are grouped by id
    folder.mkdir(parents=True, exist_ok=True)
    for spec in cfg.benchmarks:
        name, source = resolve(spec, cfg)
        if any(b.name == name for b in benchmarks):
            raise ValueError(f"benchmark {name!r} is listed twice")
        problems = source if isinstance(source, list) else list(iter_problems(source, Path("."), rejects, seen))
        problems = problems[: cfg.limit] if cfg.limit else problems
        kept = [p for p in problems if _training_prompt_key(p.prompt) not in exclude]
        if not kept:
            raise ValueError(f"benchmark {name!r} has no problems left (all {len(problems)} are training prompts)")
        path = folder / f"{name}.jsonl"
        lines = (json.dumps(asdict(replace(p, source=name))) + "\n" for p in kept)
        write_atomic_bytes(path, "".join(lines).encode())
        benchmarks.append(Benchmark(name, path, len(kept), len(problems) - len(kept)))
    return benchmarks, rejects


def source_of(benchmark: Benchmark) -> FileSource:
    """How a model's generation run reads a frozen benchmark; rows carry the benchmark's name as `source`."""
    return FileSource(path=str(benchmark.path.resolve()), name=benchmark.name)
