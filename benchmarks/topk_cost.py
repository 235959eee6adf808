"""What sparse KD (`sampling.teacher_topk`) costs at generation: throughput and bytes per generated token on disk.

    python benchmarks/topk_cost.py                       # 32 problems x n=2, 64 tokens, K = 20, 2 rounds
    python benchmarks/topk_cost.py --k 20 --max-tokens 128 --rounds 3

Two in-process engines of the embedded teacher with the recipe's settings, as `distill generate` starts them: one
with processed_logprobs, for a run without top-k (`sampling.logprobs` 5, the entropy summary only: what every recipe
does today), one with raw_logprobs, for a run with `teacher_topk: K` (its entropy still on 5). Same 32 problems,
sampling (n=2, seed 0) and part settings; the rounds alternate the two so that machine noise hits both. Throughput is
`tokens_per_s` of stats.json (from the first request to the last part written: our parsing and part writing
included, engine start-up excluded). Bytes per token are the raw parts' sizes on disk (zstd Parquet, as PartWriter
writes them) over the completion tokens; the top-k columns alone are read from the Parquet footers (compressed
column chunks). The engine's own float32 log-probs, written as float16 and as float32, give the float16 saving.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_utilization import make_recipe  # the 32 problems of the engine benchmarks


def part_bytes(raw_dir: Path) -> tuple[int, int]:
    """(bytes of the raw parts, bytes of their top-k column chunks)."""
    from pipeline.records import TOPK_COLUMNS

    total = topk = 0
    for part in sorted(raw_dir.glob("part-*.parquet")):
        total += part.stat().st_size
        meta = pq.read_metadata(part)
        for g in range(meta.num_row_groups):
            for c in range(meta.row_group(g).num_columns):
                column = meta.row_group(g).column(c)
                if column.path_in_schema.split(".")[0] in TOPK_COLUMNS:
                    topk += column.total_compressed_size
    return total, topk


def logprob_bytes(captured: list, tokens: int) -> dict[str, float]:
    """Bytes per token (zstd Parquet) of the log-prob column alone, as float16 (stored) and float32, from the
    engine's own float32 values (float16 values widened back would compress better than real float32 ones)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("float16", pa.float16()), ("float32", pa.float32())):
            table = pa.table({"x": pa.array([c.astype(dtype.to_pandas_dtype()) for c in captured], pa.list_(dtype))})
            pq.write_table(table, f"{tmp}/{name}.parquet", compression="zstd")
            out[name] = Path(f"{tmp}/{name}.parquet").stat().st_size / tokens
    return out


class Capturing:
    """A teacher whose completions' float32 top-k log-probs are kept aside (before the stage rounds them)."""

    def __init__(self, teacher):
        self.teacher, self.captured = teacher, []

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def generate(self, requests, sampling):
        for result in self.teacher.generate(requests, sampling):
            self.captured += [c.topk.topk_logprobs for c in result.completions if c.topk is not None]
            yield result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=20, help="sampling.teacher_topk of the top-k runs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="without/with pairs")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # two engines beside the rest of the machine's work

    from pipeline.generate.stage import generate
    from pipeline.generate.teacher.base import PROCESSED_LOGPROBS, RAW_LOGPROBS
    from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher, load_llm
    from pipeline.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="topk-cost-"))
    probe = make_recipe(work, "probe", args.max_tokens)
    model = resolve_model(probe.teacher.model)
    engines = {
        0: VLLMEngineTeacher(model, probe.teacher, llm=load_llm(model, probe.teacher, 0, None, PROCESSED_LOGPROBS)),
        args.k: Capturing(
            VLLMEngineTeacher(model, probe.teacher, llm=load_llm(model, probe.teacher, 0, None, RAW_LOGPROBS))
        ),
    }
    for k, teacher in engines.items():  # warm-up: the first batch of a fresh engine is slow
        generate(
            make_recipe(work, f"warm-{k}", 8, [f"sampling.teacher_topk={k}", "sampling.logprobs=5"]),
            quiet=True,
            teacher=teacher,
        )

    speed: dict[int, list[float]] = {0: [], args.k: []}
    sizes: dict[int, tuple[int, int, int]] = {}
    for i in range(args.rounds):
        for k, teacher in engines.items():
            recipe = make_recipe(
                work, f"k{k}-{i}", args.max_tokens, [f"sampling.teacher_topk={k}", "sampling.logprobs=5"]
            )
            stats = generate(recipe, quiet=True, teacher=teacher)
            assert stats["problems_answered"] == 32, stats["failures"][:3]
            speed[k].append(stats["tokens_per_s"])
            if k:  # the last round's values only, as for the sizes
                teacher.captured = teacher.captured[-stats["completions"] :]
            sizes[k] = (*part_bytes(recipe.run_dir / "raw"), stats["completion_tokens"])
            print(
                f"round {i}, K={k}: {stats['tokens_per_s']:.1f} tok/s, {stats['completion_tokens']} tokens", flush=True
            )

    base, topk = statistics.median(speed[0]), statistics.median(speed[args.k])
    print(
        f"\ngeneration tokens/s (median of {args.rounds}): K=0 {base:.1f}, K={args.k} {topk:.1f}, "
        f"ratio {topk / base:.3f}"
    )
    for k, (total, columns, tokens) in sizes.items():
        print(
            f"raw parts, K={k}: {total / tokens:.1f} bytes per generated token ({total} bytes, {tokens} tokens)"
            + (f"; top-k columns {columns / tokens:.1f} bytes per token" if k else "")
        )
    total, columns, tokens = sizes[args.k]
    lp = logprob_bytes(engines[args.k].captured, tokens)
    print(
        f"top-k log-probs alone: float16 {lp['float16']:.1f}, float32 {lp['float32']:.1f} bytes per token; the "
        f"K={args.k} parts with float32 would take {(total / tokens) + lp['float32'] - lp['float16']:.1f}"
    )
    print(f"uncompressed top-k columns: {4 + args.k * (4 + 2)} bytes per token (float16), {4 + args.k * 8} (float32)")


if __name__ == "__main__":
    main()
