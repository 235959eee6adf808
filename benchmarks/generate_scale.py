"""`distill generate` at scale against an endpoint that answers at once: rows/s, peak RSS and resume start-up.

    python benchmarks/generate_scale.py                             # 10^4, 10^5, 10^6 problems x 4, 2 shard processes
    python benchmarks/generate_scale.py --sizes 1e4 1e5 --shards 1  # one process per run, no shard=I/N
    python benchmarks/generate_scale.py --sizes 1e4 --work /tmp/gs --keep
    python benchmarks/generate_scale.py --resume-only 1e6           # the resume of 10^6 finished problems alone

What runs: benchmarks/instant_openai.py in its own process. It answers every request at once, so the teacher costs
nothing and what is measured is the pipeline: reading the source, rendering, the openai client, rows, parts and
the ledger. For each size P, a JSONL source of P problems is written (untimed), then `distill generate RECIPE
overrides... -q` runs as S processes at once, `shard=I/S` each (as the tasks of a Slurm array would; with
`--shards 1`, one process without `shard=`), then the same S commands run again on the finished run: the time until
they exit with nothing to do is the start-up cost of a resume at P finished problems.

Figures: rows/s = completions written / wall time of the generate processes (first start to last exit, start-up
included); peak RSS = ru_maxrss of each process from os.wait4 (the kernel's high-water mark of that process, which
no polling interval can miss); requests/s = chat requests / (last - first) as the endpoint counted them (the rate
the client reached); resume = wall time of the re-run (its slowest process), which must send no request. Targets
(issue 13): peak RSS at 10^6 problems under 2 GB, resume start-up at 10^6 under 30 s.

Settings, and why:
- sampling.n=4, the samples per problem of the issue; sampling.logprobs=0 by default (generate asks for logprobs
  only when weighting needs them; `--logprobs K` measures the cost of K of them per token).
- output.part_rows=4096, part_seconds=600: at 4·10^6 rows a run closes ~1,000 parts instead of ~16,000 at the
  default 256 rows, so what is timed is the pipeline and not one Parquet file, fsync and rename per 64 problems;
  a crash still loses at most one part (~1 s of work here, minutes against a real teacher).
- teacher.concurrency=4: the endpoint answers at once, so 4 requests in flight keep it busy; more only adds
  httpcore's pool bookkeeping, which grows with the connections (measured here: ~4 ms of client CPU per request
  at 1-4 in flight, ~7 ms at 16-64). `--concurrency 64` measures the default.
- --no-verify: the inline verify of 4·10^6 rows is verify's benchmark (benchmarks/verify_throughput.py).

--resume-only SIZE: the resume start-up and peak RSS of a finished run of SIZE problems, WITHOUT generating them
through the endpoint. The openai client costs ~6.6 ms of CPU per problem here (2 shared cores), so generating 10^6
problems x 4 through it takes 1-2 hours; the resume's cost depends only on what a finished run holds. So: a real
first run (the same commands, `sources.0.limit=8`) writes run.json, recipe.yaml, locks, too_long/ and real rows
(the fingerprint holds teacher, templates and sampling, not the sources, so it is the whole run's); then one
process per shard writes every other problem of its shard with the project's own code (the source stream, the
renderer, `generate.stage._rows` with a `TeacherResult` of the 4 completions the endpoint gave, and
`parts.PartWriter` with the shard's `Shard`, under its lock), after checking that the rows it builds for the seed
problems equal the seed run's column for column; then the real S commands run on that run, timed, and must send no
request. Caveat: the index files were just written, so they are in the page cache (a cold start on NFS reads them
from the server). This mode does not measure the generating process's peak RSS at SIZE.

Run it against another checkout of the code with PYTHONPATH=THAT_TREE (the child processes inherit it, and the
editable install's finder comes after PYTHONPATH), e.g. `git archive HEAD | tar -x -C /tmp/head`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RSS_TARGET_MB = 2048
RESUME_TARGET_S = 30.0
TARGET_PROBLEMS = 10**6


@dataclass
class Phase:
    """One set of processes run at once: wall time from the first start to the last exit, each one's peak RSS."""

    wall_s: float
    rss_mb: list[float]
    cpu_s: list[float]  # user + system CPU of each process: near wall_s means it is bound by its own CPU
    requests: int  # chat requests the endpoint served during the phase
    request_rate: float  # per second between its first and last request


@dataclass
class Result:
    problems: int
    processes: int
    rows: int
    parts: int
    raw_mb: float
    generate: Phase
    resume: Phase
    commands: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.generate.wall_s


class Endpoint:
    """benchmarks/instant_openai.py in its own process, so that it has a core of its own where there is one."""

    def __init__(self, completion_chars: int):
        script = ROOT / "benchmarks" / "instant_openai.py"
        cmd = [sys.executable, str(script), "--completion-chars", str(completion_chars)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"instant endpoint did not start: {line!r}")
        self.url = line.split()[1]

    def stats(self, reset: bool = False) -> dict:
        """Chat requests and connections since the last reset, with the wall clock of the first and last request."""
        url = self.url.removesuffix("/v1") + "/stats" + ("?reset" if reset else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def write_source(path: Path, problems: int) -> None:
    """Short sums with their answers: the rows are small, so the figures are those of the pipeline per problem."""
    with path.open("w") as f:
        for i in range(problems):
            a, b = i % 997, i % 1009
            f.write(json.dumps({"id": f"p{i:07d}", "prompt": f"What is {a} + {b}?", "reference": str(a + b)}) + "\n")


def overrides(args, url: str) -> list[str]:
    """The recipe overrides of every command of a run (see the settings in the docstring)."""
    return [
        "teacher.backend=openai",
        "teacher.model=instant",
        f"teacher.endpoints=[{url}]",
        f"teacher.concurrency={args.concurrency}",
        "sampling.n=4",
        f"sampling.logprobs={args.logprobs}",
        "sampling.max_tokens=64",
        f"output.part_rows={args.part_rows}",
        "output.part_seconds=600",
    ]


def commands(args, recipe: Path, url: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    """The S commands of one run: `shard=I/S` each, or one with none (`--shards 1`, or `--one-process`)."""
    base = [args.distill, "generate", str(recipe), *overrides(args, url), *extra, "--no-verify", "-q"]
    if args.shards == 1:
        return [base]
    if args.one_process:  # the shards in turn in one process (LocalExecutor): no concurrent writers needed
        return [[*base, f"executor.shards={args.shards}"]]
    return [[*base, f"shard={i}/{args.shards}"] for i in range(args.shards)]


def run_at_once(cmds: list[list[str]], logs: Path, label: str, env: dict) -> tuple[float, list, list]:
    """Start every command, wait for all: wall s, peak RSS MB and CPU s of each. A failure prints its log, stops."""
    procs, out, rss, cpu = [], [], {}, {}
    started = time.monotonic()
    for i, cmd in enumerate(cmds):
        log = (logs / f"{label}-{i}.log").open("w")
        out.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))

    def reap(proc: subprocess.Popen) -> None:
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone (Popen.wait would not give it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss[proc.pid] = usage.ru_maxrss / 1024  # KiB on Linux
        cpu[proc.pid] = usage.ru_utime + usage.ru_stime

    threads = [threading.Thread(target=reap, args=(p,)) for p in procs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    wall = time.monotonic() - started
    for log in out:
        log.close()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            tail = (logs / f"{label}-{i}.log").read_text()[-3000:]
            raise SystemExit(f"{label}: exit {p.returncode}: {shlex.join(cmds[i])}\n{tail}")
    return wall, [rss[p.pid] for p in procs], [cpu[p.pid] for p in procs]


def phase(endpoint: Endpoint, cmds, logs: Path, label: str, env: dict) -> Phase:
    endpoint.stats(reset=True)
    wall, rss, cpu = run_at_once(cmds, logs, label, env)
    served = endpoint.stats(reset=True)
    span = served["last"] - served["first"]
    return Phase(wall, rss, cpu, served["chat_requests"], served["chat_requests"] / span if span > 0 else 0.0)


def count_rows(raw: Path) -> tuple[int, int, int, float]:
    """(rows, distinct (problem_id, sample_index), parts, MB) of a run's closed parts."""
    import pyarrow.parquet as pq

    parts = sorted(p for p in raw.glob("part-*.parquet"))
    table = pq.read_table(parts, columns=["problem_id", "sample_index"]) if parts else None
    rows = table.num_rows if table is not None else 0
    distinct = table.group_by(["problem_id", "sample_index"]).aggregate([]).num_rows if rows else 0
    return rows, distinct, len(parts), sum(p.stat().st_size for p in parts) / 2**20


def write_recipe(folder: Path, problems: int) -> tuple[Path, dict]:
    """The source (written once per folder, untimed) and the recipe of a run of `problems`; no run folder yet."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "problems.jsonl"
    if not source.exists():
        write_source(source, problems)
    recipe = folder / "recipe.yaml"
    data = {
        "name": f"scale-{problems}",
        "sources": [{"type": "file", "path": str(source), "name": "scale", "domain": "math"}],
        "output": {"runs_dir": str(folder / "runs")},
    }
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.rmtree(folder / "runs", ignore_errors=True)  # a fresh run each time
    return recipe, data


def bench_size(args, endpoint: Endpoint, work: Path, problems: int, env: dict) -> Result:
    folder = work / f"p{problems}"
    recipe, data = write_recipe(folder, problems)
    cmds = commands(args, recipe, endpoint.url)
    for cmd in cmds:
        print(f"  $ {shlex.join(cmd)}", flush=True)
    generated = phase(endpoint, cmds, folder, "generate", env)
    print(
        f"  generate {generated.wall_s:.1f} s, {generated.request_rate:,.0f} requests/s, peak RSS "
        f"{_mb(generated.rss_mb)} MB, CPU {_mb(generated.cpu_s)} s; at this rate {TARGET_PROBLEMS:,} problems take "
        f"{generated.wall_s * TARGET_PROBLEMS / problems / 60:.0f} min",
        flush=True,
    )
    rows, distinct, parts, raw_mb = count_rows(folder / "runs" / data["name"] / "raw")
    expected = problems * 4
    if rows != expected or distinct != rows:
        raise SystemExit(f"P={problems}: {rows} rows, {distinct} distinct (problem_id, sample_index), want {expected}")
    resumed = phase(endpoint, cmds, folder, "resume", env)
    if resumed.requests:
        raise SystemExit(f"P={problems}: the resume of a finished run sent {resumed.requests} requests, want 0")
    return Result(problems, len(cmds), rows, parts, raw_mb, generated, resumed, [shlex.join(c) for c in cmds])


SEED_PROBLEMS = 8  # --resume-only: problems the real first run generates through the endpoint (sources.0.limit)


@dataclass
class ResumeOnly:
    """--resume-only: a finished run of `problems` whose parts PartWriter wrote directly, and the resume of it."""

    problems: int
    processes: int
    rows: int
    parts: int
    raw_mb: float
    index_mb: float
    write_s: float  # the direct writing of the parts (untimed as far as the targets go)
    seed: Phase
    resume: Phase
    commands: list[str] = field(default_factory=list)


def write_finished_shard(recipe_path: str, recipe_overrides: list[str], index: int, count: int, seed: list[str]):
    """Write every problem of shard `index` of `count` that the seed parts lack into raw parts, as a run that had
    generated it would have: the real source stream, renderer, `stage._rows` and `PartWriter` (under the shard's
    lock), each problem answered by the n completions the endpoint gave the seed run's first problem.

    The seed run's own rows (of the problems this shard owns) are rebuilt the same way first and must equal them,
    column for column (but `created_at` and `latency_s`, a clock's): the written rows are those a real run writes.
    Runs in a process of its own, one per shard at once, as the shard processes of a real run do.
    """
    import pyarrow.parquet as pq

    from pipeline.config import load_recipe
    from pipeline.executor import Shard
    from pipeline.generate.completion import Completion
    from pipeline.generate.render import Renderer
    from pipeline.generate.sources import stream_problems
    from pipeline.generate.stage import _rows
    from pipeline.generate.teacher.base import TeacherResult
    from pipeline.parts import PartWriter, ShardLock, read_index

    started = time.monotonic()
    recipe = load_recipe(recipe_path, recipe_overrides)
    shard, run_dir = Shard(index, count), recipe.run_dir
    seed_rows: dict[str, list[dict]] = {}
    for row in pq.read_table(seed).to_pylist():
        seed_rows.setdefault(row["problem_id"], []).append(row)
    template = sorted(next(iter(seed_rows.values())), key=lambda r: r["sample_index"])
    completions = [
        Completion(
            r["sample_index"], r["completion"], r["finish_reason"], r["completion_tokens"], r["mean_token_entropy"]
        )
        for r in template
    ]
    clock = {"created_at", "latency_s"}
    renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
    provenance: dict | None = None
    checked = rows = 0
    with ShardLock(run_dir, shard):
        done = read_index(run_dir / "raw", shard)
        writer = PartWriter(run_dir / "raw", recipe.output.part_rows, recipe.output.part_seconds, shard=shard)
        with writer:
            for problem in stream_problems(recipe.sources, Path(recipe.base_dir), [], shard):
                messages = renderer.messages(problem)
                result = TeacherResult(problem.id, completions, template[0]["prompt_tokens"], template[0]["latency_s"])
                if provenance is None:  # the columns `_rows` leaves to its caller, as the seed run filled them
                    own = _rows(problem, messages, result, {})[0]
                    provenance = {k: v for k, v in template[0].items() if k not in own}
                built = _rows(problem, messages, result, provenance)
                if problem.id in done:
                    real = sorted(seed_rows.get(problem.id, []), key=lambda r: r["sample_index"])
                    strip = [{k: v for k, v in r.items() if k not in clock} for r in real]
                    if strip != [{k: v for k, v in r.items() if k not in clock} for r in built]:
                        raise SystemExit(f"rows built for {problem.id} differ from the seed run's:\n{real}\n{built}")
                    checked += 1
                    continue
                writer.add(built)
                rows += len(built)
    return {"rows": rows, "parts": writer.parts_written, "checked": checked, "seconds": time.monotonic() - started}


def resume_only(args, endpoint: Endpoint, work: Path, problems: int, env: dict) -> ResumeOnly:
    """A finished run of `problems` made without generating it through the endpoint, then its resume, timed."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from pipeline.parts import INDEX_DIR, closed_parts

    folder = work / f"resume-p{problems}"
    recipe, data = write_recipe(folder, problems)
    raw = folder / "runs" / data["name"] / "raw"
    # 1. A real first run of the first SEED_PROBLEMS problems: run.json (the fingerprint has no sources in it, so it
    # is that of the whole run), recipe.yaml, locks, too_long/, rejects, and real rows to copy and check against.
    seed_cmds = commands(args, recipe, endpoint.url, (f"sources.0.limit={SEED_PROBLEMS}",))
    print(f"  seed run: $ {shlex.join(seed_cmds[0])}{' (and the other shards)' if len(seed_cmds) > 1 else ''}")
    seed = phase(endpoint, seed_cmds, folder, "seed", env)
    seed_parts = [str(p) for p in closed_parts(raw)]
    if seed.requests != SEED_PROBLEMS or not seed_parts:
        raise SystemExit(f"seed run: {seed.requests} requests, {len(seed_parts)} parts, want {SEED_PROBLEMS}, 1+")
    # 2. The rest of every shard's problems: parts written by PartWriter directly, the shards at once.
    shards = args.shards
    started = time.monotonic()
    jobs = [(str(recipe), overrides(args, endpoint.url), i, shards, seed_parts) for i in range(shards)]
    with ProcessPoolExecutor(shards, mp_context=get_context("spawn")) as pool:
        written = list(pool.map(write_finished_shard, *zip(*jobs, strict=True)))
    write_s = time.monotonic() - started
    checked = sum(w["checked"] for w in written)
    print(
        f"  PartWriter wrote {sum(w['rows'] for w in written):,} rows in {sum(w['parts'] for w in written):,} parts "
        f"in {write_s:.0f} s ({shards} processes); {checked} seed problems rebuilt equal to the seed run's rows",
        flush=True,
    )
    if checked != SEED_PROBLEMS:
        raise SystemExit(f"{checked} seed problems checked against the rows built here, want {SEED_PROBLEMS}")
    # 3. The resume: the real commands of the run, which must find every problem done and send nothing.
    cmds = commands(args, recipe, endpoint.url)
    for cmd in cmds:
        print(f"  $ {shlex.join(cmd)}", flush=True)
    resumed = phase(endpoint, cmds, folder, "resume", env)
    if resumed.requests:
        raise SystemExit(f"P={problems}: the resume of a finished run sent {resumed.requests} requests, want 0")
    rows, distinct, parts, raw_mb = count_rows(raw)
    if rows != problems * 4 or distinct != rows:
        raise SystemExit(
            f"P={problems}: {rows} rows, {distinct} distinct (problem_id, sample_index), want {problems * 4}"
        )
    index_mb = sum(p.stat().st_size for p in (raw / INDEX_DIR).glob("*.json")) / 2**20
    return ResumeOnly(
        problems, len(cmds), rows, parts, raw_mb, index_mb, write_s, seed, resumed, [shlex.join(c) for c in cmds]
    )


def resume_table(r: ResumeOnly) -> str:
    s = r.resume
    cpu = " / ".join(f"{c:.1f}" for c in s.cpu_s)
    ok_rss, ok_resume = max(s.rss_mb) < RSS_TARGET_MB, s.wall_s < RESUME_TARGET_S
    return (
        "| finished problems | processes | rows | parts | raw MB | index MB | parts written directly s "
        "| resume start-up s | resume peak RSS MB | resume CPU s | requests sent |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {r.problems:,} | {r.processes} | {r.rows:,} | {r.parts:,} | {r.raw_mb:,.0f} | {r.index_mb:,.1f} "
        f"| {r.write_s:,.0f} | {s.wall_s:,.1f} | {_mb(s.rss_mb)} | {cpu} | {s.requests} |\n\n"
        f"| target at {r.problems:,} finished problems | measured | ratio | |\n|---|---:|---:|---|\n"
        f"| resume start-up < {RESUME_TARGET_S:.0f} s | {s.wall_s:.1f} s | {s.wall_s / RESUME_TARGET_S:.2f} "
        f"| {'pass' if ok_resume else 'FAIL'} |\n"
        f"| resume peak RSS < {RSS_TARGET_MB:,} MB (each process) | {max(s.rss_mb):,.0f} MB "
        f"| {max(s.rss_mb) / RSS_TARGET_MB:.2f} | {'pass' if ok_rss else 'FAIL'} |\n\n"
        "The parts of this run were written by pipeline.parts.PartWriter directly, not through the endpoint (see "
        "--resume-only):\nthe generating process's peak RSS at this size is not measured by this mode."
    )


def code_path(args, env: dict) -> str:
    """The `pipeline` package the CLI imports (this tree, or the one PYTHONPATH names)."""
    python = Path(args.distill).with_name("python")
    python = str(python) if python.exists() else sys.executable
    check = [python, "-c", "import pipeline; print(pipeline.__file__)"]
    found = subprocess.run(check, capture_output=True, text=True, env=env, cwd="/")
    return str(Path(found.stdout.strip()).parent) if found.returncode == 0 else f"unknown ({found.stderr[-200:]})"


def _mb(values: list[float]) -> str:
    return " / ".join(f"{v:,.0f}" for v in values)


def table(results: list[Result]) -> str:
    lines = [
        "| problems | processes | rows | parts | raw MB | generate s | rows/s | requests/s | peak RSS MB "
        "| resume start-up s | resume peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        g, s = r.generate, r.resume
        lines.append(
            f"| {r.problems:,} | {r.processes} | {r.rows:,} | {r.parts:,} | {r.raw_mb:,.0f} | {g.wall_s:,.1f} "
            f"| {r.rows_per_s:,.0f} | {g.request_rate:,.0f} | {_mb(g.rss_mb)} | {s.wall_s:,.1f} | {_mb(s.rss_mb)} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> str:
    at = next((r for r in results if r.problems == TARGET_PROBLEMS), None)
    if at is None:
        return f"targets at {TARGET_PROBLEMS:,} problems: not measured (add 1e6 to --sizes)"
    rss = max(max(at.generate.rss_mb), max(at.resume.rss_mb))
    ok_rss, ok_resume = rss < RSS_TARGET_MB, at.resume.wall_s < RESUME_TARGET_S
    return (
        f"| target at {TARGET_PROBLEMS:,} problems | measured | ratio | |\n|---|---:|---:|---|\n"
        f"| peak RSS < {RSS_TARGET_MB:,} MB | {rss:,.0f} MB | {rss / RSS_TARGET_MB:.2f} "
        f"| {'pass' if ok_rss else 'FAIL'} |\n"
        f"| resume start-up < {RESUME_TARGET_S:.0f} s | {at.resume.wall_s:.1f} s "
        f"| {at.resume.wall_s / RESUME_TARGET_S:.2f} | {'pass' if ok_resume else 'FAIL'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6], help="problems per run")
    parser.add_argument("--shards", type=int, default=2, help="S: shard processes run at once (shard=I/S); 1: one")
    parser.add_argument(
        "--one-process", action="store_true", help="run the S shards in turn in one process (executor.shards=S)"
    )
    parser.add_argument(
        "--resume-only",
        type=float,
        metavar="SIZE",
        help="measure only the resume of a finished run of SIZE problems, its parts written by PartWriter directly",
    )
    parser.add_argument("--work", type=Path, help="folder for sources, runs and logs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    parser.add_argument("--concurrency", type=int, default=4, help="teacher.concurrency of each process")
    parser.add_argument("--logprobs", type=int, default=0, help="sampling.logprobs (top-k per token; 0: none)")
    parser.add_argument("--part-rows", type=int, default=4096, help="output.part_rows")
    parser.add_argument("--completion-chars", type=int, default=400, help="length of each canned completion")
    default_distill = ROOT / ".venv" / "bin" / "distill"
    parser.add_argument(
        "--distill", default=str(default_distill) if default_distill.exists() else "distill", help="the CLI to run"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes]
    work = args.work or Path(tempfile.mkdtemp(prefix="generate_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    endpoint = Endpoint(args.completion_chars)
    results: list[Result] = []
    print(
        f"endpoint {endpoint.url}; work folder {work}; {os.cpu_count()} CPUs; code {code_path(args, env)}", flush=True
    )
    try:
        if args.resume_only:
            problems = int(args.resume_only)
            print(
                f"P={problems:,} finished problems, parts written by PartWriter directly (--resume-only):", flush=True
            )
            r = resume_only(args, endpoint, work, problems, env)
            print(f"\n{len(r.commands)} resume processes at once, n=4, part_rows={args.part_rows}\n")
            print(resume_table(r))
            return
        for problems in sizes:
            print(f"P={problems:,}:", flush=True)
            r = bench_size(args, endpoint, work, problems, env)
            results.append(r)
            print(
                f"  {r.rows:,} rows in {r.parts:,} parts ({r.rows_per_s:,.0f} rows/s); resume start-up "
                f"{r.resume.wall_s:.1f} s, peak RSS {_mb(r.resume.rss_mb)} MB, CPU {_mb(r.resume.cpu_s)} s",
                flush=True,
            )
    finally:
        endpoint.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mode = "1 process" if len(results[0].commands) == 1 else f"{args.shards} shard processes at once"
    print(f"\n{mode}, n=4, logprobs={args.logprobs}, concurrency={args.concurrency}, part_rows={args.part_rows}\n")
    print(table(results))
    print()
    print(targets(results))


if __name__ == "__main__":
    main()
