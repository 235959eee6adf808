"""The evaluation report: report.json (`results`: accuracy, `performance`: speed and memory), report.md and plots.

The first model is the reference (the teacher): each other model's accuracy retention (its pass@1 over the
reference's), speed-up (generated tokens/s over the reference's) and memory reduction (weights bytes) are the
headline the seeds ask for, measured by the tool itself. pass@1 is printed with its standard error so a reader sees
when two models are within noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from eval.benchmarks import Benchmark
from eval.config import EvalConfig
from eval.metrics import ModelRun, Sample, cons_at_k, pass_at_1
from pipeline.build.card import markdown_table, save_figure
from pipeline.parts import write_atomic_bytes

ALL = "all"  # every problem of every benchmark pooled


def _finite(value: float | None) -> float | None:
    """NaN (no problems, or one problem for a standard error) becomes null: report.json stays strict JSON."""
    return None if value is None or math.isnan(value) else value


def _ratio(value, reference) -> float | None:
    if _finite(value) is None or not _finite(reference):
        return None
    return value / reference


def _scores(problems: list[list[Sample]], vote: bool) -> dict:
    p1 = pass_at_1(problems)
    cons = cons_at_k(problems) if vote else None
    return {
        "pass@1": _finite(p1.value),
        "pass@1_stderr": _finite(p1.stderr),
        "cons@k": _finite(cons.value) if cons else None,
        "cons@k_stderr": _finite(cons.stderr) if cons else None,
        "problems": p1.problems,
        "unanswered": sum(not s for s in problems),
        "samples": sum(len(s) for s in problems),
    }


def _problem_ids(benchmark: str, runs: list[ModelRun]) -> list[str]:
    """The benchmark's problems as any model saw them: each model is scored on all of them, answered or not, except
    those whose reference a verifier found unreadable for any model (a data fault), which no model is scored on."""
    faults = set().union(*(run.data_faults for run in runs))
    seen = dict.fromkeys(pid for run in runs for pid in run.samples.get(benchmark, {}))
    return [pid for pid in seen if pid not in faults]


def build_report(cfg: EvalConfig, benchmarks: list[Benchmark], runs: list[ModelRun], voting: set[str]) -> dict:
    names = [b.name for b in benchmarks] + ([ALL] if len(benchmarks) > 1 else [])
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    ids = {b.name: _problem_ids(b.name, runs) for b in benchmarks}
    vote = {b.name: any(run.domains.get(b.name) in voting for run in runs) for b in benchmarks}
    for run in runs:
        answered = {b.name: [run.samples.get(b.name, {}).get(pid, []) for pid in ids[b.name]] for b in benchmarks}
        for b in benchmarks:
            results[b.name][run.label] = _scores(answered[b.name], vote[b.name])
        if ALL in results:
            pooled = [s for b in benchmarks for s in answered[b.name]]
            results[ALL][run.label] = _scores(pooled, all(vote.values()))
    reference = runs[0]
    for by_model in results.values():
        for scores in by_model.values():
            scores["retention"] = _ratio(scores["pass@1"], by_model[reference.label]["pass@1"])
    performance = {}
    for run in runs:
        perf = dict(run.performance)
        perf["speedup"] = _ratio(perf.get("tokens_per_s"), reference.performance.get("tokens_per_s"))
        size_ratio = _ratio(perf.get("size_on_disk_bytes"), reference.performance.get("size_on_disk_bytes"))
        perf["memory_reduction"] = None if size_ratio is None else 1 - size_ratio
        performance[run.label] = perf
    overall = names[-1]
    return {
        "protocol": {
            "samples_per_problem": cfg.samples,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": cfg.seed,
            "engine": cfg.engine.backend,
        },
        "reference": reference.label,
        "models": [
            {"label": r.label, "model": r.model, "revision": r.revision, "generations": str(r.run_dir)} for r in runs
        ],
        "benchmarks": [
            {"name": b.name, "problems": b.problems, "excluded_as_training": b.excluded_as_training}
            for b in benchmarks
        ],
        "results": results,
        "performance": performance,
        "headline": {
            r.label: {
                "accuracy_retention": results[overall][r.label]["retention"],
                "speedup": performance[r.label]["speedup"],
                "memory_reduction": performance[r.label]["memory_reduction"],
            }
            for r in runs[1:]
        },
        "incomplete": {
            r.label: {
                "unscored_samples": r.unscored,
                "infra_errors": r.infra_errors,
                "unanswered": r.unanswered,
                "data_faults": len(r.data_faults),
            }
            for r in runs
        },
        "needs_retry": [r.label for r in runs if r.unscored or r.infra_errors],
    }


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if kind == "int":
        return f"{value:,}"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:.2f}"


def _pm(value, stderr) -> str:
    return _fmt(value, "pct") + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def markdown(report: dict, plots: list[str]) -> str:
    p = report["protocol"]
    k = p["samples_per_problem"]
    lines = [
        "# Evaluation report",
        "",
        f"Protocol (DeepSeek-R1): {k} samples per problem at temperature {p['temperature']}, top_p {p['top_p']}, "
        f"at most {p['max_tokens']} new tokens, seed {p['seed']}, engine `{p['engine']}`. pass@1 is the mean over "
        f"problems of the share of correct samples, ± its standard error; cons@{k} is the majority vote. Every "
        "model is scored on every problem: one it left unanswered (too long for it, or failed) counts as failed. "
        f"Retention, speed-up and memory reduction are relative to `{report['reference']}`.",
        "",
    ]
    if report["headline"]:
        rows = [
            [label, _fmt(h["accuracy_retention"], "pct"), _fmt(h["speedup"], "x"), _fmt(h["memory_reduction"], "pct")]
            for label, h in report["headline"].items()
        ]
        header = ["model", "accuracy retention", "speed-up", "memory reduction (weights)"]
        lines += ["## Headline", "", markdown_table(header, rows), ""]
    rows = []
    for benchmark, by_model in report["results"].items():
        for label, s in by_model.items():
            rows.append(
                [
                    benchmark,
                    label,
                    _pm(s["pass@1"], s["pass@1_stderr"]),
                    _pm(s["cons@k"], s["cons@k_stderr"]) if s["cons@k"] is not None else "-",
                    _fmt(s["retention"], "pct"),
                    s["problems"],
                    s["unanswered"],
                    s["samples"],
                ]
            )
    header = ["benchmark", "model", "pass@1", f"cons@{k}", "retention", "problems", "unanswered", "samples"]
    lines += ["## Accuracy", "", markdown_table(header, rows), ""]
    rows = [
        [
            label,
            _fmt(f.get("tokens_per_s")),
            _fmt(f.get("speedup"), "x"),
            f"{_fmt(f.get('latency_p50_s'))} / {_fmt(f.get('latency_p95_s'))}",
            _fmt(f.get("peak_memory_bytes"), "bytes"),
            _fmt(f.get("parameters"), "int"),
            _fmt(f.get("size_on_disk_bytes"), "bytes"),
            _fmt(f.get("kv_cache_bytes_per_token"), "int"),
            _fmt(f.get("avg_completion_tokens")),
            _fmt(f.get("avg_reasoning_tokens")),
        ]
        for label, f in report["performance"].items()
    ]
    header = [
        "model",
        "tokens/s",
        "speed-up",
        "latency p50 / p95 (s)",
        "peak memory",
        "parameters",
        "size on disk",
        "KV bytes/token",
        "avg completion tokens",
        "avg reasoning tokens",
    ]
    lines += ["## Performance", "", markdown_table(header, rows), ""]
    lines += [
        "tokens/s: generated tokens per second of generation (engine start-up excluded), all requests in flight "
        "together. Latency: from submitting a problem's request to its last token (its k samples run together). "
        "Peak memory: resident memory the engine added while it ran (on CPU it includes the KV cache the engine "
        "reserves up front). Memory reduction compares the weights' bytes.",
        "",
    ]
    incomplete = {m: v for m, v in report["incomplete"].items() if any(v.values())}
    if incomplete:
        lines += [
            f"**Incomplete**: `{json.dumps(incomplete)}`. Re-running the same command retries infrastructure errors; "
            "problems too long for a model stay unanswered and count as failed in its scores.",
            "",
        ]
    lines += [f"![{Path(plot).stem}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def plot(report: dict, folder: Path) -> list[str]:
    """Accuracy with standard-error bars per benchmark and model, and the serving costs; relative paths."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    labels = [m["label"] for m in report["models"]]
    benchmarks = list(report["results"])
    width = 0.8 / len(labels)
    top = 0.0
    fig = Figure(figsize=(max(5, 1.6 * len(benchmarks) + 2), 3.8))
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        scores = [report["results"][b][label] for b in benchmarks]
        values = [100 * (s["pass@1"] or 0) for s in scores]
        errors = [100 * (s["pass@1_stderr"] or 0) for s in scores]
        ax.bar([j + i * width for j in range(len(benchmarks))], values, width, yerr=errors, capsize=3, label=label)
        top = max([top, *(v + e for v, e in zip(values, errors, strict=True))])
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(benchmarks))], benchmarks)
    ax.set(ylabel="pass@1 (%) ± standard error", title="Accuracy", ylim=(0, min(100, max(5, 1.25 * top))))
    ax.legend()
    save_figure(fig, folder / "accuracy.png")

    panels = [
        ("tokens_per_s", "generated tokens/s", 1),
        ("latency_p50_s", "latency p50 (s)", 1),
        ("parameters", "parameters (millions)", 1e6),
        ("peak_memory_bytes", "peak memory (GiB)", 2**30),
    ]
    fig = Figure(figsize=(3.2 * len(panels), 3.2))
    for n, (key, title, scale) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), n)
        values = [(report["performance"][label].get(key) or 0) / scale for label in labels]
        ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save_figure(fig, folder / "performance.png")
    return ["plots/accuracy.png", "plots/performance.png"]


def write_report(report: dict, folder: Path) -> None:
    plots = plot(report, folder / "plots")
    write_atomic_bytes(folder / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic_bytes(folder / "report.md", markdown(report, plots).encode())
