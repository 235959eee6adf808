"""How much of the engine's throughput `distill generate` keeps: its generated tokens/s over raw `vllm.LLM`'s.

    python benchmarks/engine_utilization.py            # 32 problems, n=2, 256 tokens, 2 rounds each; Ray: 128
    python benchmarks/engine_utilization.py --rounds 3 --max-tokens 128 --ray-problems 256

Both sides see the same 32 rendered prompts and the same SamplingParams, in the same process and the
same engine, alternating raw/ours so that machine noise hits both. Throughput excludes engine start-up on both
sides (ours: `generation_s` in stats.json, from the first request to the last part written). The server line runs
`distill generate` with the openai backend against a managed vLLM server, and is divided by the raw in-process
figure: the cost of HTTP, JSON and the client included. Targets: >= 0.95 in-process, >= 0.90 through the server.

The Ray line runs `distill generate executor.type=ray executor.workers=2 executor.cpus_per_worker=1` (a local Ray
cluster of 2 actors, each with its own in-process vLLM engine on one thread) on a larger recipe: `--ray-problems`
problems in `--ray-shards` shards, so that each actor generates for minutes after its engine started and pulls
several shards. Its denominator is NOT the 32-problem in-process line, but a one-process `distill generate` of that
very recipe (same problems and prompts, same sampling and seed; `executor` left local: one shard), on this process's
engine (the in-process line's: the default multiprocess engine) and alternated with the Ray run, `--ray-rounds`
pairs, in one benchmark run on one machine; both figures are `tokens_per_s` of stats.json, engine start-up excluded.
The workload is larger on both sides because a Ray run's `generation_s` spans from the first request of any shard to
the end of the last: one actor's engine coming up a few seconds after the other's, and the last shard's tail, would
weigh on 32 problems. The two actors share the 2 cores as the one-process engine's processes do (frontend, engine
core, model worker): the target, >= 0.85, says that Ray costs next to nothing. Every engine here has the same
settings (the recipe's teacher; VLLM_CPU_KVCACHE_SPACE defaults to 2 GiB for all of them, room for 64 sequences of
this workload, so that two engines fit beside the rest of the machine's work).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


DEMO_MATH_PROBLEMS = 16
RAY = ["executor.type=ray", "executor.workers=2", "executor.cpus_per_worker=1"]


def make_recipe(runs_dir: Path, name: str, max_tokens: int, overrides: list[str] = (), problems: int = 32):
    """`problems`: the 16 demo math problems and reasoning-gym ones, half of each task (the first 32 are those of
    the in-process lines)."""
    from pipeline.config import load_recipe

    gym_size = (problems - DEMO_MATH_PROBLEMS) // 2
    assert gym_size > 0 and DEMO_MATH_PROBLEMS + 2 * gym_size == problems, f"problems={problems}: 16 + an even number"
    base = [
        f"name={name}",
        f"output.runs_dir={runs_dir}",
        f"sampling.max_tokens={max_tokens}",
        "sampling.n=2",
        "sampling.seed=0",
        "output.part_rows=64",
        # 16 demo math problems + 2 x gym_size reasoning-gym problems (32 by default)
        "sources=[{type: file, path: ../data/demo_math.jsonl, columns: {prompt: question, reference: answer}},"
        f" {{type: reasoning_gym, tasks: [basic_arithmetic, chain_sum], size: {gym_size}, seed: 3}}]",
    ]
    return load_recipe(ROOT / "recipes" / "demo.yaml", [*base, *overrides])


def rendered_prompts(recipe, tokenizer) -> list[str]:
    from pipeline.generate.render import Renderer
    from pipeline.generate.sources import load_problems

    problems, _ = load_problems(recipe.sources, Path(recipe.base_dir))
    assert len(problems) == 32, len(problems)
    renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
    return [
        tokenizer.apply_chat_template(renderer.messages(p), tokenize=False, add_generation_prompt=True)
        for p in problems
    ]


def raw_tokens_per_s(llm, prompts, params) -> float:
    started = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.monotonic() - started
    return sum(len(c.token_ids) for o in outputs for c in o.outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="raw/ours pairs per backend")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ray-problems", type=int, default=128, help="problems of the Ray run and its denominator")
    parser.add_argument("--ray-shards", type=int, default=8, help="shards of the Ray run (4 for each of 2 workers)")
    parser.add_argument("--ray-rounds", type=int, default=1, help="one-process/Ray pairs (a Ray run restarts engines)")
    args = parser.parse_args()
    # Before any engine starts, so that all of them (this process's, the server's, the Ray actors') have the same.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from pipeline.generate.stage import generate
    from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher, load_llm, sampling_params
    from pipeline.generate.teacher.vllm_server import ManagedVLLMServer
    from pipeline.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="engine-util-"))
    recipe = make_recipe(work, "probe", args.max_tokens)
    model = resolve_model(recipe.teacher.model)
    llm = load_llm(model, recipe.teacher, seed=0)
    prompts = rendered_prompts(recipe, llm.get_tokenizer())
    params = sampling_params(recipe.sampling)
    raw_tokens_per_s(llm, prompts[:4], params)  # warm-up: the first batch of a fresh engine is slow

    raw, ours = [], []
    for i in range(args.rounds):
        raw.append(raw_tokens_per_s(llm, prompts, params))
        teacher = VLLMEngineTeacher(model, recipe.teacher, llm=llm)
        stats = generate(make_recipe(work, f"inprocess-{i}", args.max_tokens), quiet=True, teacher=teacher)
        assert stats["problems_answered"] == 32, stats["failures"][:3]
        ours.append(stats["tokens_per_s"])
        print(f"round {i}: raw vllm.LLM {raw[-1]:.1f} tok/s, distill generate (vllm) {ours[-1]:.1f} tok/s", flush=True)

    # The Ray line and its denominator, alternated: one process on this engine (the Ray run's recipe, executor left
    # local), then the same recipe on 2 Ray actors. This engine stays up, idle, during the Ray runs: its processes
    # wait on a socket and take no CPU, and keeping it lets a second round alternate.
    large = partial(make_recipe, work, max_tokens=args.max_tokens, problems=args.ray_problems)
    on_ray = [*RAY, f"executor.shards={args.ray_shards}"]
    one_runs, ray_runs = [], []
    for i in range(args.ray_rounds):
        one_runs.append(generate(large(name=f"one-process-{i}"), quiet=True, teacher=teacher))
        ray_runs.append(generate(large(name=f"ray-{i}", overrides=on_ray), quiet=True))  # no engine in this process
        for stats in (one_runs[-1], ray_runs[-1]):
            assert stats["problems_answered"] == args.ray_problems, stats["failures"][:3]
        assert len(ray_runs[-1]["shards"]) == args.ray_shards, ray_runs[-1]["shards"]
        print(
            f"round {i}, {args.ray_problems} problems: distill generate one process "
            f"{one_runs[-1]['tokens_per_s']:.1f} tok/s, 2 Ray workers {ray_runs[-1]['tokens_per_s']:.1f} tok/s",
            flush=True,
        )
    del llm, teacher
    gc.collect()

    served = []
    # The seed goes to the server's engine, not into each request (see SamplingConfig.seed), as vllm-server does.
    server = ManagedVLLMServer(model, recipe.teacher, work / "server.log", seed=0)
    with server:
        url = [f"teacher.endpoints=[{server.url}]", "teacher.backend=openai", "sampling.seed=null"]
        generate(make_recipe(work, "server-warmup", 16, url), quiet=True)
        for i in range(args.rounds):
            stats = generate(make_recipe(work, f"server-{i}", args.max_tokens, url), quiet=True)
            assert stats["problems_answered"] == 32, f"see {work}/server.log: {stats['failures'][:3]}"
            served.append(stats["tokens_per_s"])
            print(f"round {i}: distill generate (openai -> vllm server) {served[-1]:.1f} tok/s", flush=True)

    raw_mean = statistics.mean(raw)
    print("\n| path | tokens/s (mean) | ratio to raw vllm.LLM | target |\n| --- | --- | --- | --- |")
    print(f"| raw vllm.LLM.generate | {raw_mean:.1f} | 1.000 | |")
    for label, values, target in (("vllm in-process", ours, 0.95), ("openai -> vllm server", served, 0.90)):
        mean = statistics.mean(values)
        print(f"| distill generate, {label} | {mean:.1f} | {mean / raw_mean:.3f} | >= {target} |")
    header = f"path ({args.ray_problems} problems, n=2, {args.max_tokens} tokens, Ray: {args.ray_shards} shards)"
    print(f"\n| {header} | tokens/s (mean) | generation_s (mean) | ratio to one process | target |")
    print("| --- | --- | --- | --- | --- |")
    one_mean = statistics.mean(s["tokens_per_s"] for s in one_runs)
    for label, runs, target in (
        ("distill generate, one process (vllm)", one_runs, ""),
        ("distill generate, 2 Ray workers (1 core each)", ray_runs, ">= 0.85"),
    ):
        mean, seconds = (statistics.mean(s[k] for s in runs) for k in ("tokens_per_s", "generation_s"))
        print(f"| {label} | {mean:.1f} | {seconds:.1f} | {mean / one_mean:.3f} | {target} |")


if __name__ == "__main__":
    main()
