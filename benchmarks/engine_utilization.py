"""How much of the engine's throughput `distill generate` keeps: its generated tokens/s over raw `vllm.LLM`'s.

    python benchmarks/engine_utilization.py            # 32 problems, n=2, 256 tokens, 2 rounds each
    python benchmarks/engine_utilization.py --rounds 3 --max-tokens 128

Both sides see the same 32 rendered prompts and the same SamplingParams, in the same process and the
same engine, alternating raw/ours so that machine noise hits both. Throughput excludes engine start-up on both
sides (ours: `generation_s` in stats.json, from the first request to the last part written). The server line runs
`distill generate` with the openai backend against a managed vLLM server, and is divided by the raw in-process
figure: the cost of HTTP, JSON and the client included. Targets: >= 0.95 in-process, >= 0.90 through the server.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_recipe(runs_dir: Path, name: str, max_tokens: int, overrides: list[str] = ()):
    from pipeline.config import load_recipe

    base = [
        f"name={name}",
        f"output.runs_dir={runs_dir}",
        f"sampling.max_tokens={max_tokens}",
        "sampling.n=2",
        "sampling.seed=0",
        "output.part_rows=64",
        # 16 demo math problems + 16 reasoning-gym problems = 32
        "sources=[{type: file, path: ../data/demo_math.jsonl, columns: {prompt: question, reference: answer}},"
        " {type: reasoning_gym, tasks: [basic_arithmetic, chain_sum], size: 8, seed: 3}]",
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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
