"""`distill generate`: problems -> teacher -> crash-safe raw parts under RUNS_DIR/NAME/raw/.

    distill generate                                   # the demo recipe on the embedded teacher (CPU)
    distill generate recipes/demo.yaml sampling.n=4    # any recipe field can be overridden as FIELD=VALUE
    distill generate my.yaml teacher.backend=openai 'teacher.endpoints=[http://127.0.0.1:8000/v1]'

Re-running a run skips the problems already in closed parts (and those the teacher rejected as too long for its
context, kept in RUN/too_long/), so a crashed or killed run resumes where it stopped, and a finished run re-run
makes zero teacher calls. A run folder remembers its fingerprint (teacher and revision, templates, sampling, and
with logprobs which distribution they come from): resuming with different settings is refused rather than mixing
rows of two settings.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from itertools import chain
from pathlib import Path

import yaml

from pipeline.config_base import RecipeError
from pipeline.executor import Executor, Shard, Worker
from pipeline.executor_config import make_executor
from pipeline.generate.completion import Completion
from pipeline.generate.config import GenerateConfig, TeacherConfig
from pipeline.generate.progress import GenerationProgress
from pipeline.generate.render import Renderer
from pipeline.generate.sources import Reject, problem_digest, stream_problems
from pipeline.generate.teacher.base import Teacher, TeacherRequest, TeacherResult, logprobs_mode
from pipeline.models import ResolvedModel, resolve_model
from pipeline.parts import (
    TOO_LONG_DIR,
    TOO_LONG_SCHEMA,
    PartWriter,
    ShardLock,
    read_index,
    read_ledger,
    run_lock,
    update_stats,
    write_atomic_bytes,
)
from pipeline.records import (
    THINK_CLOSE,
    THINK_OPEN,
    TOPK_COLUMNS,
    TOPK_LOGPROB_TYPE,
    Col,
    Problem,
    fingerprint,
    split_reasoning,
)


def make_teacher(recipe: GenerateConfig, model: ResolvedModel, in_process: bool | None = None) -> Teacher:
    """The recipe's teacher backend; `in_process` (vllm): the engine's scheduler in this process (see Worker)."""
    cfg = recipe.teacher
    mode = logprobs_mode(cfg.backend, recipe.sampling.teacher_topk)  # the engines we start: raw for sparse KD
    if cfg.backend == "vllm":
        from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher

        return VLLMEngineTeacher(
            model, cfg, seed=recipe.sampling.seed, in_process=in_process or None, logprobs_mode=mode
        )
    if cfg.backend == "vllm-server":
        from pipeline.generate.teacher.vllm_server import VLLMServerTeacher

        log = recipe.run_dir / "vllm-server.log"
        return VLLMServerTeacher(model, cfg, log, seed=recipe.sampling.seed, logprobs_mode=mode)
    from pipeline.generate.teacher.openai_client import OpenAITeacher

    return OpenAITeacher(cfg, served_model=model.name)


def default_gpus_per_worker(teacher: TeacherConfig) -> float:
    """An in-process engine's GPUs (its tensor x pipeline parallel size) on a machine with GPUs; else none: a
    server or an endpoint holds its own. A driver without GPUs in front of a GPU cluster sets executor.gpus_per_worker.
    """
    if teacher.backend != "vllm" or not shutil.which("nvidia-smi"):
        return 0
    return teacher.tensor_parallel_size * teacher.pipeline_parallel_size


def _check_fingerprint(run_dir: Path, settings: dict) -> str:
    """Refuse to resume a run folder with different settings: rows of two settings must never mix."""
    config_hash = fingerprint(settings)
    run_file = run_dir / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous["config_hash"] != config_hash:
            changed = [k for k in settings if previous["settings"].get(k) != settings[k]]
            raise RecipeError(
                f"run {run_dir} was generated with other settings (changed: {', '.join(changed)}); "
                f"use a new run name (e.g. name={run_dir.name}-{config_hash[:6]}) or delete the folder"
            )
    else:
        write_atomic_bytes(run_file, json.dumps({"config_hash": config_hash, "settings": settings}, indent=2).encode())
    return config_hash


def _rows(problem: Problem, messages, result: TeacherResult, provenance: dict) -> list[dict]:
    now = datetime.now(timezone.utc)
    rows = []
    for c in result.completions:
        reasoning, answer = split_reasoning(c.text, c.reasoning_field, c.think_opened)
        # A server's reasoning parser returns the thinking apart from the content: `completion` still holds all of
        # it, in the dataset's assistant format, so the filters (repetition, paragraphs) judge the reasoning too.
        text = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}" if c.reasoning_field else c.text
        rows.append(
            {
                "problem_id": problem.id,
                "sample_index": c.sample_index,
                "source": problem.source,
                "domain": problem.domain,
                "prompt": problem.prompt,
                "reference": problem.reference,
                "metadata": json.dumps(problem.metadata, default=str),
                "messages": json.dumps(messages),
                "completion": text,
                "reasoning": reasoning,
                "answer": answer,
                "finish_reason": c.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "mean_token_entropy": c.mean_token_entropy,
                "latency_s": result.latency_s,
                "created_at": now,
                **provenance,
                **_topk_columns(c),
            }
        )
    return rows


def _topk_columns(c: Completion) -> dict:
    """Sparse KD's columns (records.TOPK_FIELDS), null without `sampling.teacher_topk`. Log-probs are rounded to
    the stored type here, so the rows a part buffers take its bytes."""
    if c.topk is None:
        return dict.fromkeys(TOPK_COLUMNS)
    return {
        Col.COMPLETION_TOKEN_IDS: c.topk.token_ids,
        Col.TOPK_TOKEN_IDS: c.topk.topk_ids,
        Col.TOPK_LOGPROBS: c.topk.topk_logprobs.astype(TOPK_LOGPROB_TYPE.to_pandas_dtype()),
        Col.TEACHER_TOPK: c.topk.k,
    }


def _too_long_row(problem: Problem, result: TeacherResult, config_hash: str) -> dict:
    return {
        "problem_id": problem.id,
        "source": problem.source,
        "prompt_tokens": result.prompt_tokens,
        "error": result.error,
        "config_hash": config_hash,
        "created_at": datetime.now(timezone.utc),
    }


@dataclass(frozen=True)
class PreparedRun:
    """What every shard of one run shares, prepared once before any shard starts (small, so that it travels to
    workers on other machines): the recipe with absolute paths, the teacher model and the run's fingerprint."""

    recipe: GenerateConfig
    model: ResolvedModel
    logprobs_mode: str
    config_hash: str


@dataclass
class ShardResult:
    """One shard's counts; `generate` adds them up into the run's stats."""

    label: str
    problems: int
    resumed: int
    complete: int
    too_long_total: int
    rejected_rows: int
    counts: Counter[str]
    failures: list[dict]
    retries: dict[str, int]
    parts_written: int
    generation_started: float | None  # wall clock (time.time) of its first request; None: nothing to generate
    generation_ended: float
    engine: str


def _absolute(recipe: GenerateConfig) -> GenerateConfig:
    """Paths that mean the same to a worker in another folder or on another host (Ray starts its workers elsewhere)."""
    output = recipe.output.model_copy(update={"runs_dir": str(Path(recipe.output.runs_dir).resolve())})
    return recipe.model_copy(update={"output": output, "base_dir": str(Path(recipe.base_dir).resolve())})


def prepare_run(recipe: GenerateConfig) -> PreparedRun:
    """Check the run's settings against its folder (refuses, RecipeError, a resume with other ones) and save them;
    under the run lock, since every shard process of the run does this when it starts."""
    recipe = _absolute(recipe)
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
    model = resolve_model(recipe.teacher.model, recipe.teacher.revision)
    entropy_from = logprobs_mode(recipe.teacher.backend, recipe.sampling.teacher_topk)
    settings = {
        "teacher": model.name,
        "teacher_revision": model.revision,
        "templates_hash": renderer.templates_hash(),
        "sampling": recipe.sampling.model_dump(),
    }
    if recipe.sampling.logprobs or recipe.sampling.teacher_topk:  # rows of two distributions must not mix
        settings["logprobs_mode"] = entropy_from
    # Saved without `executor.shard`: one array task's shard is not the run's, and verify reads this recipe.
    resolved = recipe.model_dump(mode="json", exclude={"executor": {"shard"}})
    with run_lock(run_dir):
        config_hash = _check_fingerprint(run_dir, settings)
        write_atomic_bytes(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    return PreparedRun(recipe=recipe, model=model, logprobs_mode=entropy_from, config_hash=config_hash)


def _rejects_path(run_dir: Path, shard: Shard) -> Path:
    return run_dir / ("rejects.jsonl" if shard.count == 1 else f"rejects-{shard.label}.jsonl")


def generate_shard(
    run: PreparedRun, shard: Shard, worker: Worker, quiet: bool = False, teacher: Teacher | None = None
) -> ShardResult:
    """The problems `shard` owns that no closed part holds yet -> the teacher -> raw parts named for the shard.

    Holds the shard's lock throughout (`ShardBusy` if another process has it). Problems are streamed from the
    sources and rendered as they are sent, so memory holds the shard's ledger and the requests in flight, not the
    problems. The teacher is `teacher`, or the worker's (started on the first shard that has work, kept for the next).
    """
    recipe, run_dir = run.recipe, run.recipe.run_dir
    with ExitStack() as stack:
        stack.enter_context(ShardLock(run_dir, shard))
        done = read_index(run_dir / "raw", shard)  # problem id -> content digest
        too_long_before = read_ledger(run_dir / TOO_LONG_DIR, shard)
        renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
        rejects: list[Reject] = []
        tally: Counter[str] = Counter()  # problems of the shard streamed, and of those already done
        in_flight: dict[str, tuple[Problem, list[dict]]] = {}

        def requests() -> Iterator[TeacherRequest]:
            for problem in stream_problems(recipe.sources, Path(recipe.base_dir), rejects, shard):
                tally["problems"] += 1
                if problem.id in done:
                    tally["resumed"] += 1
                    stored = done[problem.id]
                    if stored is not None and stored != problem_digest(problem):
                        # an edited row that kept its id: its old rows answer another problem
                        raise RecipeError(
                            f"run {run_dir}: problem {problem.id} changed since it was generated (same id, other "
                            "prompt, reference, domain or metadata); use a new run name or delete the folder"
                        )
                    continue
                if problem.id in too_long_before:
                    tally["resumed"] += 1
                    continue
                messages = renderer.messages(problem)
                in_flight[problem.id] = (problem, messages)
                yield TeacherRequest(problem.id, messages)

        pending = requests()
        first = next(pending, None)
        if first is not None and teacher is None:  # a finished shard starts no engine at all
            in_process = worker.engine_in_process
            teacher = worker.keep(f"teacher:{run.config_hash}", partial(make_teacher, recipe, run.model, in_process))
        generation_started = time.time() if first is not None else None  # throughput excludes engine start-up
        progress = stack.enter_context(GenerationProgress(None, len(done) + len(too_long_before), quiet))
        writer = stack.enter_context(
            PartWriter(run_dir / "raw", recipe.output.part_rows, recipe.output.part_seconds, shard=shard)
        )
        too_long = stack.enter_context(
            PartWriter(
                run_dir / TOO_LONG_DIR, recipe.output.part_rows, recipe.output.part_seconds, TOO_LONG_SCHEMA, shard
            )
        )
        sampling = recipe.sampling.model_dump()
        provenance = {
            "teacher": run.model.name,
            "teacher_revision": run.model.revision,
            "engine": teacher.engine if teacher else "",
            "engine_version": teacher.engine_version if teacher else "",
            # With the distribution mean_token_entropy was measured on (see teacher.base.logprobs_mode).
            "sampling": json.dumps(sampling | {"logprobs_mode": run.logprobs_mode}, sort_keys=True),
            "sampling_hash": fingerprint(sampling),
            "entropy_top_k": recipe.sampling.logprobs or None,
            "config_hash": run.config_hash,
        }
        counts: Counter[str] = Counter()
        failures: list[dict] = []
        retries_before = Counter(teacher.counters) if teacher else Counter()
        for result in teacher.generate(chain([first], pending), recipe.sampling) if first is not None else ():
            problem, messages = in_flight.pop(result.key)
            if result.error_kind:
                counts[result.error_kind] += 1
                failures.append({"problem_id": problem.id, "kind": result.error_kind, "error": result.error})
                if result.error_kind == "rejected_too_long":
                    too_long.add([_too_long_row(problem, result, run.config_hash)])
                continue
            template_hash = renderer.template(problem.domain).hash
            rows = _rows(problem, messages, result, provenance | {"template_hash": template_hash})
            writer.add(rows)
            tokens = sum(r["completion_tokens"] or 0 for r in rows)
            counts.update(answered=1, completions=len(rows), completion_tokens=tokens)
            progress.advance(len(rows), tokens)
        generation_ended = time.time()
        rejects_text = "".join(json.dumps(asdict(r)) + "\n" for r in rejects)
        write_atomic_bytes(_rejects_path(run_dir, shard), rejects_text.encode())
    retries = Counter(teacher.counters) if teacher else Counter()
    retries.subtract(retries_before)  # a worker's teacher counts over every shard it served: this shard's share
    return ShardResult(
        label=shard.label,
        problems=tally["problems"],
        resumed=tally["resumed"],
        complete=len(done) + counts["answered"],  # answered ones were not in the ledger
        too_long_total=counts["rejected_too_long"] + len(too_long_before),
        rejected_rows=len(rejects),
        counts=counts,
        failures=failures,
        retries=dict(retries),
        parts_written=writer.parts_written,
        generation_started=generation_started,
        generation_ended=generation_ended,
        engine=provenance["engine"],
    )


def generate(
    recipe: GenerateConfig, quiet: bool = False, teacher: Teacher | None = None, executor: Executor | None = None
) -> dict:
    """Run (or resume) one generation run, its shards run by `executor` (default: the recipe's `executor:` section;
    with none, one shard, the whole run, in this process); returns the stats also written to RUN/stats.json.
    A `teacher` given is started already and serves every shard (in this process)."""
    started = time.monotonic()
    run = prepare_run(recipe)
    if executor is None:
        executor = make_executor(recipe.executor, gpus_per_worker=default_gpus_per_worker(recipe.teacher))
    shards = executor.run(partial(generate_shard, run, quiet=quiet, teacher=teacher))
    counts = sum((s.counts for s in shards), Counter())
    retries: Counter[str] = Counter()  # update, not +: a retry kind counted zero times stays in the stats
    for s in shards:
        retries.update(s.retries)
    # Shards may run at once (Ray) or in turn: generation time is from the first request to the last shard's end.
    starts = [s.generation_started for s in shards if s.generation_started is not None]
    generation_s = max(s.generation_ended for s in shards) - min(starts) if starts else 0.0
    stats = {
        "run": recipe.name,
        "config_hash": run.config_hash,
        "teacher": run.model.name,
        "engine": next((s.engine for s in shards if s.engine), ""),
        "shards": [s.label for s in shards],
        "problems_total": sum(s.problems for s in shards),
        "problems_resumed": sum(s.resumed for s in shards),
        "problems_answered": counts["answered"],
        "problems_complete": sum(s.complete for s in shards),
        "completions": counts["completions"],
        "completion_tokens": counts["completion_tokens"],
        "tokens_per_s": counts["completion_tokens"] / generation_s if generation_s else 0.0,
        "completions_per_s": counts["completions"] / generation_s if generation_s else 0.0,
        "generation_s": generation_s,
        "elapsed_s": time.monotonic() - started,
        "rejected_rows": sum(s.rejected_rows for s in shards),
        "rejected_too_long": counts["rejected_too_long"],
        "rejected_too_long_total": sum(s.too_long_total for s in shards),
        "infra_errors": counts["infra_error"],
        "failures": [f for s in shards for f in s.failures],
        "retries": dict(retries),
        "parts_written": sum(s.parts_written for s in shards),
    }
    # One section for the run as this command ran it; a scheduler array's tasks each run one shard, so it is the
    # section of the last task to finish: `distill generate RECIPE --status` tells the state of every shard.
    update_stats(recipe.run_dir, "generate", stats)
    GenerationProgress(stats["problems_total"], stats["problems_resumed"], quiet).summary(stats)
    return stats
