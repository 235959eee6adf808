"""`distill eval`: models answer frozen benchmarks under DeepSeek-R1's protocol; the report sets them side by side.

    distill eval --model teacher=smollm2-135m-instruct --model runs/demo/student --benchmarks gym:chain_sum
    distill eval --model M --benchmarks humaneval runs/demo/dataset data/demo_math.jsonl --samples 8 --limit 50

Each model's answers are a generation run of the generate stage (OUTPUT/generations/LABEL-HASH/, resumable, same
templates, backends and verifiers), so an interrupted evaluation resumes, and re-running it makes no model call.
The folder name carries a hash of the weights and sampling: a retrained model is evaluated afresh, never mixed with
the answers of its earlier weights.

Each model is generated, verified and measured in a process of its own (`eval.worker`): vLLM does not give GPU
memory back between engines of one process, so the next model starts on a clean GPU. Which process ran each model,
and how it ended, is report.json's `workers`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pyarrow.dataset as pads

from eval.benchmarks import Benchmark, freeze, source_of
from eval.config import EvalConfig, model_label
from eval.metrics import ModelRun, Sample, percentile
from eval.report import build_report, write_report
from eval.resources import PeakMemory, kv_bytes_per_token, parameter_count, size_on_disk
from eval.worker import run_in_process
from pipeline.build.weighting import ANSWER_DOMAINS
from pipeline.config import Recipe
from pipeline.generate.config import OutputConfig, SamplingConfig
from pipeline.models import resolve_model
from pipeline.parts import closed_parts, write_atomic_bytes
from pipeline.records import DATA_FAULT, INFRA_ERROR, PASSED, Col, fingerprint

# cons@k votes on final answers; a program has no final answer to vote on.
VOTING_DOMAINS = ANSWER_DOMAINS


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _recipe(cfg: EvalConfig, label: str, model: str, revision: str, benchmarks: list[Benchmark]) -> Recipe:
    sampling = SamplingConfig(
        n=cfg.samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        logprobs=0,
        seed=cfg.seed,
    )
    settings = {"model": model, "revision": revision, "sampling": sampling.model_dump()}  # not a column
    key = fingerprint(settings)
    return Recipe(
        name=f"{_slug(label)}-{key[:8]}",
        sources=[source_of(b) for b in benchmarks],
        sampling=sampling,
        teacher=cfg.engine.model_copy(update={"model": model, "revision": revision}),
        output=OutputConfig(runs_dir=str(Path(cfg.output) / "generations")),
        verify=cfg.verify,
    )


def _collect(run: ModelRun, benchmarks: list[Benchmark]) -> list[dict]:
    """Verified rows of the frozen problems only (a run folder may hold answers to problems since removed)."""
    wanted = {}
    run.samples = {b.name: {} for b in benchmarks}
    for b in benchmarks:
        for line in b.path.read_text().splitlines():
            problem = json.loads(line)  # a frozen `Problem`: its keys are the dataclass's fields
            wanted[problem["id"]] = b.name
            run.samples[b.name][problem["id"]] = []  # stays empty when the model gives no scored answer
            run.domains[b.name] = problem["domain"]  # not a column: the Problem field
    parts = closed_parts(run.run_dir / "verified")
    columns = [Col.PROBLEM_ID, Col.DOMAIN, Col.STATUS, Col.VERDICT_DETAIL, Col.REASONING]
    columns += [Col.COMPLETION_TOKENS, Col.LATENCY_S]
    rows = pads.dataset(parts).to_table(columns=columns).to_pylist() if parts else []
    rows = [r for r in rows if r[Col.PROBLEM_ID] in wanted]
    for r in rows:
        pid = r[Col.PROBLEM_ID]
        if r[Col.STATUS] == DATA_FAULT:  # the reference, not the model, is at fault: no model is scored on it
            run.data_faults.add(pid)
            continue
        if r[Col.STATUS] == INFRA_ERROR:
            run.unscored += 1
            continue
        answer = json.loads(r[Col.VERDICT_DETAIL] or "{}").get("extracted")
        run.samples[wanted[pid]][pid].append(Sample(r[Col.STATUS] == PASSED, answer))
    for by_problem in run.samples.values():
        for pid in run.data_faults & by_problem.keys():
            del by_problem[pid]
    run.unanswered = sum(not s for by_problem in run.samples.values() for s in by_problem.values())
    return rows


def _performance(run: ModelRun, rows: list[dict], folder: Path | None, cfg: EvalConfig, generated: dict) -> dict:
    latencies = list({r[Col.PROBLEM_ID]: r[Col.LATENCY_S] for r in rows if r[Col.LATENCY_S] is not None}.values())
    tokens = [r[Col.COMPLETION_TOKENS] for r in rows if r[Col.COMPLETION_TOKENS] is not None]
    measured = run.run_dir / "performance.json"
    if generated.get("completions"):  # throughput and peak memory are only measured when this call generated
        speed = {
            "tokens_per_s": generated["tokens_per_s"],
            "peak_memory_bytes": generated["peak_memory_bytes"],
            "engine_startup_s": generated["elapsed_s"] - generated["generation_s"],
            "measured_on_completions": generated["completions"],
        }
        write_atomic_bytes(measured, json.dumps(speed, indent=2).encode())
    else:
        speed = json.loads(measured.read_text()) if measured.exists() else {}
    return {
        **speed,
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p95_s": percentile(latencies, 95) if latencies else None,
        "parameters": parameter_count(folder) if folder else None,
        "size_on_disk_bytes": size_on_disk(folder) if folder else None,
        "kv_cache_bytes_per_token": kv_bytes_per_token(folder, _engine_dtype(cfg)) if folder else None,
        "avg_completion_tokens": sum(tokens) / len(tokens) if tokens else None,
        "avg_reasoning_tokens": _reasoning_tokens(rows, folder),
    }


def _engine_dtype(cfg: EvalConfig) -> str:
    """The dtype the engine ran in: teacher.dtype "auto" is float32 on CPU, the model's own on a GPU."""
    from pipeline.generate.teacher.vllm_engine import engine_settings

    return engine_settings(cfg.engine)["dtype"]


def _reasoning_tokens(rows: list[dict], folder: Path | None) -> float | None:
    """Mean tokens of the reasoning part (the think block), counted with the model's own tokenizer."""
    if folder is None or not rows:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    counts = [len(tokenizer(r[Col.REASONING] or "", add_special_tokens=False).input_ids) for r in rows]
    return sum(counts) / len(counts)


def evaluate_model(spec: str, benchmarks: list[Benchmark], cfg: EvalConfig, quiet: bool = False) -> ModelRun:
    from pipeline.generate.stage import generate
    from pipeline.verify.stage import verify_run

    label, model = model_label(spec)
    resolved = resolve_model(model)
    folder = Path(resolved.path) if Path(resolved.path).is_dir() else None
    recipe = _recipe(cfg, label, model, resolved.revision, benchmarks)  # the revision covers the weights
    run = ModelRun(label, model, resolved.revision, recipe.run_dir)
    with PeakMemory() as memory:
        generated = generate(recipe, quiet=quiet)
    run.infra_errors = generated["infra_errors"]
    local = cfg.engine.backend != "openai"  # a remote endpoint's memory is not ours to measure
    generated["peak_memory_bytes"] = memory.peak_bytes if local else None
    verify_run(recipe.run_dir, recipe.verify, quiet=quiet)
    rows = _collect(run, benchmarks)
    run.performance = _performance(run, rows, folder, cfg, generated)
    return run


def evaluate(cfg: EvalConfig, quiet: bool = False, isolate: bool = True) -> dict:
    """Evaluate every model on every benchmark; writes and returns the report (report.json's content).

    `isolate` False evaluates the models in this process, one engine after another (a debugger can follow them;
    on a GPU the later models then share it with what the earlier ones left)."""
    output = Path(cfg.output)
    benchmarks, rejects = freeze(cfg, output / "benchmarks")
    write_atomic_bytes(
        output / "benchmarks" / "rejects.jsonl",
        "".join(json.dumps(r.__dict__) + "\n" for r in rejects).encode(),
    )
    runs, workers = [], {}
    for spec in cfg.models:
        if not isolate:
            runs.append(evaluate_model(spec, benchmarks, cfg, quiet))
            continue
        label = model_label(spec)[0]
        run, ended = run_in_process(evaluate_model, spec, benchmarks, cfg, quiet, name=f"eval worker of {label}")
        runs.append(run)
        workers[label] = ended.to_dict()
        if not quiet:
            print(f"distill eval: {label} ran in process {ended.pid} ({ended.seconds:.0f} s)", file=sys.stderr)
    report = build_report(cfg, benchmarks, runs, VOTING_DOMAINS)
    report["workers"] = {"parent_pid": os.getpid(), "models": workers}
    report["rejected_rows"] = len(rejects)
    report["output"] = str(output)
    write_report(report, output)
    return report
