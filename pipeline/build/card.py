"""The dataset card and terminal stats: one set of tables, so the README and `distill stats` never disagree.

The card's YAML front matter is what the Hub reads to offer the viewer and `load_dataset` without a loading script;
its `data/{split}-*` globs must match shards that exist, so a split the stats claim but the folder lacks is an error
here rather than a broken viewer later. Plots use a bare `Figure` (Agg canvas) so no global pyplot state is touched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline.build.shards import MANIFEST
from pipeline.parts import write_atomic_bytes
from pipeline.records import Col

README, STATS, PLOTS_DIR = "README.md", "stats.json", "plots"
_SIZE_LABELS = ["n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "1B<n<10B"]
_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}

Table = tuple[str, list[str], list[list[str]]]


def size_category(n: int) -> str:
    """The Hub's buckets: 1K is the first boundary, then each a factor of ten."""
    for i, label in enumerate(_SIZE_LABELS):
        if n < 1000 * 10**i:
            return label
    return "n>10B"


def _rate(x: float) -> str:
    return f"{x:.1%}"


def _cell(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "-" if value is None else str(value)


def card_tables(stats: dict) -> list[Table]:
    """Plain strings, so the README and the rich terminal view format every number identically."""
    dropped, rows_in = stats.get("dropped", {}), stats.get("rows_in", 0)
    counts = [["in", rows_in], ["kept", stats.get("kept", 0)], ["dropped", sum(dropped.values())]]
    by_size = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    tables: list[Table] = [
        ("Counts", ["stage", "rows"], [[k, _cell(n)] for k, n in counts]),
        ("Splits", ["split", "rows"], [[s, _cell(n)] for s, n in _ordered(stats.get("splits", {}))]),
        (
            "Drop reasons",
            ["reason", "rows", "share of input"],
            [[k, _cell(n), _rate(n / rows_in) if rows_in else "-"] for k, n in by_size],
        ),
    ]
    for key, label in (("pass_rate_by_source", Col.SOURCE), ("pass_rate_by_domain", Col.DOMAIN)):
        rates = sorted(stats.get(key, {}).items())
        tables.append((f"Pass rate by {label}", [label, "pass rate"], [[k, _rate(v)] for k, v in rates]))
    fields = ["mean", "p50", "p90", "max"]
    tokens = sorted(stats.get("tokens", {}).items())
    tables.append(("Token lengths", ["field", *fields], [[k, *(_cell(d.get(f)) for f in fields)] for k, d in tokens]))
    decon = sorted(stats.get("decontamination", {}).items())
    columns = ["n", "removed", "source"]
    tables.append(
        ("Decontamination", ["eval set", *columns], [[k, *(_cell(d.get(c)) for c in columns)] for k, d in decon])
    )
    return tables


def _ordered(splits: dict) -> list[tuple[str, int]]:
    return sorted(splits.items(), key=lambda kv: (_SPLIT_ORDER.get(kv[0], 9), kv[0]))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def save_figure(fig, path: Path) -> None:
    """Temp name then rename, like every other artefact, so a reader never embeds half a PNG."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def render_plots(dataset_dir: Path, stats: dict) -> list[tuple[str, str]]:
    """(alt text, relative path) of each plot written; plots with no data are skipped rather than drawn empty."""
    from matplotlib.figure import Figure

    out_dir = Path(dataset_dir) / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title, xlabel in (
        (Col.COMPLETION_TOKENS, "Completion length", "completion tokens"),
        (Col.WEIGHT, "Sample weight", Col.WEIGHT),
    ):
        hist = stats.get("histograms", {}).get(key) or {}
        edges, counts = hist.get("edges", []), hist.get("counts", [])
        if not counts or len(edges) != len(counts) + 1:
            continue
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.stairs(counts, edges, fill=True, alpha=0.8)
        ax.set(title=title, xlabel=xlabel, ylabel="rows")
        save_figure(fig, out_dir / f"{key}.png")
        written.append((title, f"{PLOTS_DIR}/{key}.png"))
    rates = stats.get("pass_rate_by_source", {})
    if rates:
        names = sorted(rates)
        fig = Figure(figsize=(6, 0.5 + 0.4 * len(names)))
        ax = fig.add_subplot()
        ax.barh(names, [rates[n] for n in names])
        ax.set(title="Pass rate by source", xlabel="pass rate", xlim=(0, 1))
        save_figure(fig, out_dir / "pass_rate_by_source.png")
        written.append(("Pass rate by source", f"{PLOTS_DIR}/pass_rate_by_source.png"))
    kept = {path for _, path in written}
    for stale in out_dir.glob("*.png"):  # a rebuild without that data must not publish the old plot
        if f"{PLOTS_DIR}/{stale.name}" not in kept:
            stale.unlink()
    return written


def front_matter(dataset_dir: Path, stats: dict) -> dict:
    splits = [s for s, _ in _ordered(stats.get("splits", {}))]
    missing = [s for s in splits if not any((Path(dataset_dir) / "data").glob(f"{s}-*.parquet"))]
    if not splits or missing:
        raise ValueError(
            f"card needs shards for every split; none found for {missing or 'any split'} in {dataset_dir}"
        )
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}],
        "license": stats.get("license", "other"),
        "task_categories": ["text-generation"],
        "tags": ["distillation", "reasoning", "synthetic"],
        "size_categories": [size_category(stats.get("kept", 0))],
        "pretty_name": stats.get("name", Path(dataset_dir).name),
    }


_ENTROPY_SOURCES = {
    "processed_logprobs": "the distribution each token was sampled from (vLLM's processed_logprobs: temperature "
    "and top-p applied)",
    "raw_logprobs": "the teacher's own distribution at temperature 1 (vLLM's raw_logprobs, before temperature and "
    "top-p: what a run with `sampling.teacher_topk` asks for, to distill from)",
    "endpoint": "the logprobs the teacher's endpoint returned: for a default `vllm serve`, raw_logprobs, the model's "
    "distribution before temperature and top-p (`--logprobs-mode processed_logprobs` gives the sampled one)",
}
_UNRECORDED = "not recorded (older rows; vLLM's default then: raw logprobs, before temperature and top-p)"


def entropy_note(dataset_dir: Path) -> str:
    """Say which distribution `mean_token_entropy` (and so `weight`) was measured on, from the rows' provenance."""
    modes: set[str] = set()
    for shard in sorted((Path(dataset_dir) / "data").glob("*.parquet")):
        if Col.SAMPLING not in pq.read_schema(shard).names:  # a table made outside `distill build`
            modes.add(None)
            continue
        for value in pq.read_table(shard, columns=[Col.SAMPLING]).column(Col.SAMPLING).unique().to_pylist():
            modes.add(json.loads(value).get("logprobs_mode") if value else None)
    sources = "; ".join(sorted(_ENTROPY_SOURCES.get(m, _UNRECORDED) for m in modes)) or "no rows"
    what = "`mean_token_entropy`, and the `weight` made from it, is the entropy of the top-k distribution"
    return f"{what} of {sources}."


def topk_note(stats: dict) -> str | None:
    """What sparse KD's columns hold and cost, when the rows have them (`sampling.teacher_topk`)."""
    topk = stats.get("teacher_topk")  # not a column: the stats of the top-k columns
    if not topk:
        return None
    ks = ", ".join(str(k) for k in topk["k"])
    cost = f"{topk['bytes_per_token']:.1f} bytes per completion token on disk"
    total = f"{topk['bytes'] / 2**20:.1f} MiB for {_cell(topk['tokens'])} tokens"
    return (
        f"{_cell(topk['rows'])} rows carry the teacher's top-k for sparse distillation (K = {ks}): "
        f"`{Col.COMPLETION_TOKEN_IDS}` (the teacher's sampled token ids of the assistant turn), "
        f"`{Col.TOPK_TOKEN_IDS}` and `{Col.TOPK_LOGPROBS}` (flattened [tokens x K], most likely first; the "
        f"teacher's raw log-probs at temperature 1, float16) and `{Col.TEACHER_TOPK}`; they take {cost} ({total})."
    )


def render_card(dataset_dir: Path, stats: dict, recipe_yaml: str) -> Path:
    dataset_dir = Path(dataset_dir)
    meta = front_matter(dataset_dir, stats)
    plots = render_plots(dataset_dir, stats)
    name = meta["pretty_name"]
    teacher = stats.get("teacher", "unknown")  # not a column: the stats name every teacher of the rows
    domains = ", ".join(stats.get("domains", [])) or "unspecified"
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False).rstrip() + "\n---",
        f"# {name}",
        f"Reasoning traces distilled from the teacher `{teacher}` over the {domains} "
        f"domain(s) with `distill`: completions were verified, filtered, deduplicated and decontaminated, keeping "
        f"{stats.get('kept', 0)} of {stats.get('rows_in', 0)} rows. Recipe hash `{stats.get('recipe_hash', '')}`.",
        entropy_note(dataset_dir),
    ]
    if note := topk_note(stats):
        parts.append(note)
    for title, header, rows in card_tables(stats):
        parts.append(f"## {title}\n\n" + (markdown_table(header, rows) if rows else "_none_"))
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{alt}]({path})" for alt, path in plots))
    parts.append(
        "## Loading\n\n```python\nimport datasets\n\n"
        f'ds = datasets.load_dataset("parquet", data_dir="{dataset_dir.name}/data")\n'
        f'# or, once published:\nds = datasets.load_dataset("<user>/{name}")\n```'
    )
    longest = max((len(m) for m in re.findall(r"`+", recipe_yaml)), default=0)
    fence = "`" * max(3, longest + 1)  # a fence the recipe itself cannot close
    parts.append(f"## Recipe\n\n{fence}yaml\n{recipe_yaml.rstrip()}\n{fence}")
    path = dataset_dir / README
    write_atomic_bytes(path, ("\n\n".join(parts) + "\n").encode())
    return path


def print_stats(dataset_dir: Path, console=None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console()
    dataset_dir = Path(dataset_dir)
    manifest = json.loads((dataset_dir / MANIFEST).read_text())
    stats_path = dataset_dir / STATS
    if stats_path.is_file():
        for title, header, rows in card_tables(json.loads(stats_path.read_text())):
            table = RichTable(*header, title=title, title_justify="left")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    else:
        console.print(f"[yellow]{stats_path} missing: shard list only[/yellow]")
    table = RichTable("file", "split", "rows", "MB", title="Shards", title_justify="left")
    for entry in manifest["shards"]:
        table.add_row(entry["file"], entry["split"], str(entry["rows"]), f"{entry['bytes'] / 2**20:.2f}")
    console.print(table)
