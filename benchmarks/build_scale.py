"""`distill build` at scale: rows/s and peak RSS when building from 1,000,000 synthetic rows.

    python benchmarks/build_scale.py                 # 1,000,000 rows, 4 samples per problem
    python benchmarks/build_scale.py --rows 100000   # a quicker look

The rows are written as verified parts first (not timed), with R1-like lengths: reasoning of a few thousand
characters (log-normal), a short answer, prompts of a few hundred. The build runs in a child process so that its
peak RSS (ru_maxrss of that process alone) is what is reported. Target: peak RSS under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _texts(rng: np.random.Generator, pool: list[str], lengths: np.ndarray) -> list[str]:
    starts = rng.integers(0, len(pool), size=len(lengths))
    return [
        " ".join(pool[(s + j) % len(pool)] for j in range(max(1, int(n) // 60)))
        for s, n in zip(starts, lengths, strict=True)
    ]


def write_synthetic_run(run_dir: Path, rows: int, samples: int, seed: int = 0) -> None:
    from pipeline.parts import PartWriter
    from pipeline.records import VERIFIED_SCHEMA

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(5000)] + ["let", "me", "check", "so", "the", "answer", "is", "=", "+", "\\frac"]
    pool = [" ".join(rng.choice(words, size=10)) for _ in range(20000)]  # ~60-character phrases
    problems = rows // samples
    with PartWriter(run_dir / "verified", max_rows=256, max_seconds=1e9, schema=VERIFIED_SCHEMA) as writer:
        for start in range(0, problems, 64):
            batch = range(start, min(problems, start + 64))
            n = len(batch) * samples
            reasoning = _texts(rng, pool, rng.lognormal(np.log(2500), 0.6, size=n))
            answers = _texts(rng, pool, rng.integers(60, 400, size=n))
            # prompts from independently drawn words: distinct problems must not look like near duplicates
            prompts = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(20, 100, size=len(batch))]
            passed = rng.random(n) < 0.6
            entropy = rng.random(n) * 1.6
            out, k = [], 0
            for j, p in enumerate(batch):
                group = []
                for i in range(samples):
                    group.append(
                        {
                            "problem_id": f"p{p}",
                            "sample_index": i,
                            "source": f"source{p % 7}",
                            "domain": "math",
                            "prompt": prompts[j],
                            "reference": "42",
                            "metadata": json.dumps({"task": f"task{p % 23}"}),
                            "messages": json.dumps([{"role": "user", "content": prompts[j]}]),
                            "completion": f"<think>\n{reasoning[k]}\n</think>\n\n{answers[k]}",
                            "reasoning": reasoning[k],
                            "answer": answers[k],
                            "finish_reason": "stop",
                            "prompt_tokens": len(prompts[j]) // 4,
                            "completion_tokens": (len(reasoning[k]) + len(answers[k])) // 4,
                            "mean_token_entropy": float(entropy[k]),
                            "entropy_top_k": 5,
                            "teacher": "synthetic",
                            "sampling": "{}",
                            "config_hash": "x",
                            "verifier": "math",
                            "status": "passed" if passed[k] else "failed",
                            "passed": bool(passed[k]),
                            "reason": "correct" if passed[k] else "wrong_answer",
                            "verdict_detail": json.dumps({"extracted": str(k % 3)}),
                            "failed_filters": [],
                        }
                    )
                    k += 1
                out.append(group)
            for group in out:
                writer.add(group)


def _build(run_dir: str, queue) -> None:
    from pipeline.build.config import BuildConfig
    from pipeline.build.stage import build

    started = time.monotonic()
    stats = build(Path(run_dir), BuildConfig(), base_dir=Path(run_dir), quiet=True)
    elapsed = time.monotonic() - started
    queue.put(
        {
            "rows_in": stats["rows_in"],
            "kept": stats["kept"],
            "elapsed_s": elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=4, help="samples per problem")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="build-scale-"))
    started = time.monotonic()
    write_synthetic_run(run_dir, args.rows, args.samples)
    raw_mb = sum(p.stat().st_size for p in (run_dir / "verified").glob("*.parquet")) / 2**20
    written_s = time.monotonic() - started
    print(f"synthetic verified parts: {args.rows} rows, {raw_mb:.0f} MB zstd, written in {written_s:.0f}s")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_build, args=(str(run_dir), queue))
    child.start()
    result = queue.get()
    child.join()
    print(
        f"build: {result['rows_in']} rows in, {result['kept']} kept, {result['elapsed_s']:.0f}s, "
        f"{result['rows_in'] / result['elapsed_s']:.0f} rows/s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(target < 2048 MB) -> {'OK' if result['peak_rss_mb'] < 2048 else 'OVER'}"
    )
    print(f"output: {run_dir / 'dataset'}")


if __name__ == "__main__":
    main()
