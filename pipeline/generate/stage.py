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
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import yaml

from pipeline.config_base import RecipeError
from pipeline.executor import Executor, LocalExecutor, Shard
from pipeline.generate.config import GenerateConfig
from pipeline.generate.progress import GenerationProgress
from pipeline.generate.render import Renderer
from pipeline.generate.sources import changed_problems, load_problems
from pipeline.generate.teacher.base import Teacher, TeacherRequest, TeacherResult, logprobs_mode
from pipeline.models import ResolvedModel, resolve_model
from pipeline.parts import (
    TOO_LONG_DIR,
    TOO_LONG_SCHEMA,
    PartWriter,
    RunLock,
    read_ledger,
    update_stats,
    write_atomic_bytes,
)
from pipeline.records import THINK_CLOSE, THINK_OPEN, Problem, fingerprint, split_reasoning


def make_teacher(recipe: GenerateConfig, model: ResolvedModel) -> Teacher:
    cfg = recipe.teacher
    if cfg.backend == "vllm":
        from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher

        return VLLMEngineTeacher(model, cfg, seed=recipe.sampling.seed)
    if cfg.backend == "vllm-server":
        from pipeline.generate.teacher.vllm_server import VLLMServerTeacher

        return VLLMServerTeacher(model, cfg, recipe.run_dir / "vllm-server.log", seed=recipe.sampling.seed)
    from pipeline.generate.teacher.openai_client import OpenAITeacher

    return OpenAITeacher(cfg, served_model=model.name)


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
            }
        )
    return rows


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
    """What every shard of one run shares, prepared once under the run lock before any shard starts: the problems
    and their rendering, the teacher model, the run's fingerprint, and what its ledgers already hold."""

    recipe: GenerateConfig
    problems: list[Problem]
    rejected_rows: int  # source rows that made no problem (RUN/rejects.jsonl)
    renderer: Renderer
    model: ResolvedModel
    logprobs_mode: str
    config_hash: str
    done: frozenset[str]  # problem ids in closed raw parts
    too_long_before: frozenset[str]  # problems the teacher refused as too long for its context: never sent again


@dataclass
class ShardResult:
    """One shard's counts; `generate` adds them up into the run's stats."""

    problems: int
    resumed: int
    complete: int
    too_long_total: int
    counts: Counter[str]
    failures: list[dict]
    retries: dict[str, int]
    parts_written: int
    generation_s: float
    engine: str


def prepare_run(recipe: GenerateConfig) -> PreparedRun:
    """Load and check the run's inputs; refuses (RecipeError) a resume whose settings or problems changed."""
    run_dir = recipe.run_dir
    problems, rejects = load_problems(recipe.sources, Path(recipe.base_dir))
    write_atomic_bytes(run_dir / "rejects.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in rejects).encode())
    renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
    model = resolve_model(recipe.teacher.model, recipe.teacher.revision)
    entropy_from = logprobs_mode(recipe.teacher.backend)
    settings = {
        "teacher": model.name,
        "teacher_revision": model.revision,
        "templates_hash": renderer.templates_hash({p.domain for p in problems}),
        "sampling": recipe.sampling.model_dump(),
    }
    if recipe.sampling.logprobs:  # rows whose entropies come from two distributions must not mix
        settings["logprobs_mode"] = entropy_from
    config_hash = _check_fingerprint(run_dir, settings)
    resolved = recipe.model_dump(mode="json") | {"base_dir": str(Path(recipe.base_dir).resolve())}
    write_atomic_bytes(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    done = read_ledger(run_dir / "raw")
    changed = changed_problems(run_dir / "raw", [p for p in problems if p.id in done])
    if changed:  # an edited row that kept its id: its old rows answer another problem
        raise RecipeError(
            f"run {run_dir}: problem(s) {', '.join(changed[:10])} changed since they were generated (same id, "
            "other prompt, reference, domain or metadata); use a new run name or delete the folder"
        )
    too_long_before = read_ledger(run_dir / TOO_LONG_DIR)
    return PreparedRun(
        recipe=recipe,
        problems=problems,
        rejected_rows=len(rejects),
        renderer=renderer,
        model=model,
        logprobs_mode=entropy_from,
        config_hash=config_hash,
        done=frozenset(done),
        too_long_before=frozenset(too_long_before),
    )


def generate_shard(run: PreparedRun, shard: Shard, quiet: bool = False, teacher: Teacher | None = None) -> ShardResult:
    """The problems `shard` owns that no closed part holds yet -> the teacher -> raw parts named for the shard.

    Starts its own teacher when it has work and none is given (as a worker elsewhere would), none when it has none.
    """
    recipe, run_dir = run.recipe, run.recipe.run_dir
    problems = [p for p in run.problems if shard.owns(p.id)]
    todo = [p for p in problems if p.id not in run.done and p.id not in run.too_long_before]
    by_id = {p.id: p for p in todo}
    messages = {p.id: run.renderer.messages(p) for p in todo}
    sampling = recipe.sampling.model_dump()
    counts: Counter[str] = Counter()
    failures: list[dict] = []
    with ExitStack() as stack:
        if teacher is None and todo:  # a finished run re-run starts no engine at all
            teacher = stack.enter_context(make_teacher(recipe, run.model))
        generation_started = time.monotonic()  # throughput excludes engine start-up
        progress = stack.enter_context(GenerationProgress(len(problems), len(problems) - len(todo), quiet))
        writer = stack.enter_context(
            PartWriter(run_dir / "raw", recipe.output.part_rows, recipe.output.part_seconds, shard=shard)
        )
        too_long = stack.enter_context(
            PartWriter(
                run_dir / TOO_LONG_DIR,
                recipe.output.part_rows,
                recipe.output.part_seconds,
                TOO_LONG_SCHEMA,
                shard=shard,
            )
        )
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
        requests = (TeacherRequest(p.id, messages[p.id]) for p in todo)
        for result in teacher.generate(requests, recipe.sampling) if teacher else ():
            problem = by_id[result.key]
            if result.error_kind:
                counts[result.error_kind] += 1
                failures.append({"problem_id": problem.id, "kind": result.error_kind, "error": result.error})
                if result.error_kind == "rejected_too_long":
                    too_long.add([_too_long_row(problem, result, run.config_hash)])
                continue
            template_hash = run.renderer.template(problem.domain).hash
            rows = _rows(problem, messages[problem.id], result, provenance | {"template_hash": template_hash})
            writer.add(rows)
            tokens = sum(r["completion_tokens"] or 0 for r in rows)
            counts.update(answered=1, completions=len(rows), completion_tokens=tokens)
            progress.advance(len(rows), tokens)
        generation_s = time.monotonic() - generation_started
    return ShardResult(
        problems=len(problems),
        resumed=len(problems) - len(todo),
        complete=sum(shard.owns(i) for i in run.done) + counts["answered"],  # answered ones were not in the ledger
        too_long_total=counts["rejected_too_long"] + sum(p.id in run.too_long_before for p in problems),
        counts=counts,
        failures=failures,
        retries=dict(teacher.counters) if teacher else {},
        parts_written=writer.parts_written,
        generation_s=generation_s,
        engine=provenance["engine"],
    )


def generate(
    recipe: GenerateConfig, quiet: bool = False, teacher: Teacher | None = None, executor: Executor | None = None
) -> dict:
    """Run (or resume) one generation run, its shards run by `executor` (default: one shard, the whole run, in this
    process); returns the stats also written to RUN/stats.json. A `teacher` given is started already and serves
    every shard."""
    started = time.monotonic()
    lock = RunLock(recipe.run_dir)
    try:
        run = prepare_run(recipe)
        shards = (executor or LocalExecutor()).run(partial(generate_shard, run, quiet=quiet, teacher=teacher))
        counts = sum((s.counts for s in shards), Counter())
        retries: Counter[str] = Counter()  # update, not +: a retry kind counted zero times stays in the stats
        for s in shards:
            retries.update(s.retries)
        generation_s = sum(s.generation_s for s in shards)  # shard after shard: their generation times add up
        elapsed = time.monotonic() - started
        stats = {
            "run": recipe.name,
            "config_hash": run.config_hash,
            "teacher": run.model.name,
            "engine": next((s.engine for s in shards if s.engine), ""),
            "problems_total": sum(s.problems for s in shards),
            "problems_resumed": sum(s.resumed for s in shards),
            "problems_answered": counts["answered"],
            "problems_complete": sum(s.complete for s in shards),
            "completions": counts["completions"],
            "completion_tokens": counts["completion_tokens"],
            "tokens_per_s": counts["completion_tokens"] / generation_s,
            "completions_per_s": counts["completions"] / generation_s,
            "generation_s": generation_s,
            "elapsed_s": elapsed,
            "rejected_rows": run.rejected_rows,
            "rejected_too_long": counts["rejected_too_long"],
            "rejected_too_long_total": sum(s.too_long_total for s in shards),
            "infra_errors": counts["infra_error"],
            "failures": [f for s in shards for f in s.failures],
            # a shared teacher counts over every shard itself; each shard's own teacher counted only its shard
            "retries": dict(teacher.counters) if teacher else dict(retries),
            "parts_written": sum(s.parts_written for s in shards),
        }
        update_stats(recipe.run_dir, "generate", stats)
        GenerationProgress(stats["problems_total"], stats["problems_resumed"], quiet).summary(stats)
        return stats
    finally:
        lock.release()
