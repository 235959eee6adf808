"""The `distill` command: one subcommand per stage of the data path (generate, verify, build, sft, eval, and run for
all of them). `distill SUBCOMMAND --help`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    gen = sub.add_parser(
        "generate",
        help="answer a recipe's problems with the teacher into crash-safe raw Parquet parts",
        description=(
            "Answer the recipe's problems with the teacher; completions stream into RUNS_DIR/NAME/raw/part-*.parquet."
            " Re-running resumes: problems already in closed parts are skipped. Without a recipe, runs the demo"
            " recipe on the embedded teacher (SmolLM2-135M-Instruct on CPU)."
        ),
        epilog=(
            "examples: distill generate recipes/demo.yaml sampling.n=4 teacher.backend=vllm-server name=demo-n4 | "
            "one shard of N, e.g. a Slurm array task: distill generate RECIPE "
            "shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT | on Ray actors: distill generate RECIPE "
            "executor.type=ray executor.workers=4 (executor.address=HOST:PORT for an existing cluster)"
        ),
    )
    gen.add_argument("recipe", nargs="?", type=Path, default=DEMO_RECIPE, help=f"YAML recipe (default: {DEMO_RECIPE})")
    gen.add_argument(
        "overrides",
        nargs="*",
        metavar="FIELD=VALUE",
        help="override any recipe field, dotted, value parsed as YAML: sampling.n=4 'teacher.endpoints=[URL]'; "
        "shard=I/N does shard I of N alone (executor.shard=I executor.shards=N)",
    )
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary (batch jobs)")
    gen.add_argument(
        "--status",
        action="store_true",
        help="say which shards of the run are complete, partial (running or stopped) or not started; generate nothing",
    )
    gen.add_argument(
        "--no-verify", action="store_true", help="skip the inline verify stage (same as verify.inline=false)"
    )

    ver = sub.add_parser(
        "verify",
        help="judge completions (math-verify, code sandbox, reasoning-gym scorers) and apply quality filters",
        description=(
            "Judge a run's raw parts into RUN/verified/ (verdict, reason, failed_filters per row), or any"
            " JSONL/Parquet file with domain, reference and completion columns (--input/--output)."
            " Never calls the teacher: re-run it after changing a verifier or filter setting."
        ),
        epilog="examples: distill verify runs/demo | distill verify --input gens.jsonl --output gens.parquet",
    )
    ver.add_argument("target", nargs="?", type=Path, help="a run folder (uses its recipe.yaml) or a recipe YAML")
    ver.add_argument(
        "overrides",
        nargs="*",
        metavar="FIELD=VALUE",
        help="e.g. verify.math.timeout_s=10; shard=I/N verifies the raw parts of shard I of N alone",
    )
    ver.add_argument("--input", type=Path, help="file mode: JSONL or Parquet rows to verify")
    ver.add_argument("--output", type=Path, help="file mode: Parquet file to write (rejects beside it)")
    ver.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    bld = sub.add_parser(
        "build",
        help="turn verified parts into a sharded Parquet dataset with a card and a manifest",
        description=(
            "Select, weight, deduplicate, decontaminate and mix a run's verified completions into RUN/dataset/"
            " (Hugging Face layout: data/train-*.parquet, README.md card with plots, manifest.json with sha256)."
            " Dropped rows and their reasons go to RUN/build_exclusions.parquet."
        ),
        epilog="example: distill build runs/demo build.pass_rate_band=[0.2,0.8] build.max_per_problem=2",
    )
    bld.add_argument("target", type=Path, help="a run folder (uses its recipe.yaml) or a recipe YAML")
    bld.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="e.g. build.shard_mb=128 build.seed=1")
    bld.add_argument("--quiet", "-q", action="store_true", help="no summary")

    sts = sub.add_parser("stats", help="print a built dataset's card tables", description="Print a dataset's tables.")
    sts.add_argument("dataset", type=Path, help="a dataset folder (RUN/dataset)")
    sts.add_argument("--check", action="store_true", help="verify every shard against manifest.json; exit 1 if not")

    pub = sub.add_parser(
        "publish",
        help="push a built dataset to the Hugging Face Hub",
        description="Upload a dataset folder with huggingface_hub (token from HF_TOKEN or the login cache).",
    )
    pub.add_argument("dataset", type=Path, help="a dataset folder (RUN/dataset)")
    pub.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    pub.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    pub.add_argument("--dry-run", action="store_true", help="print exactly what would be uploaded, upload nothing")

    sub.add_parser(
        "sft",
        add_help=False,
        help="fine-tune a student on a built dataset with TRL (weighted loss, LoRA, logit distillation)",
        description="`distill sft --help` lists every field (TRL's SFTConfig and ModelConfig, and ours).",
    )
    ev = sub.add_parser(
        "eval",
        help="score models side by side on benchmarks (DeepSeek-R1 protocol) into report.md/report.json/plots",
        description=(
            "Each model answers every benchmark with k samples per problem (temperature 0.6, top_p 0.95); the"
            " project's verifiers score them. The report gives pass@1 ± standard error, cons@k, accuracy retention,"
            " tokens/s, latency, memory, parameters and size, relative to the first model (the teacher)."
        ),
        epilog=(
            "example: distill eval --model teacher=smollm2-135m-instruct --model runs/demo/student"
            " --benchmarks gym:chain_sum humaneval --limit 20 --samples 4 --output runs/eval-demo"
        ),
    )
    ev.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="[LABEL=]MODEL",
        help="a model folder or the embedded alias; repeat for each model, the teacher first",
    )
    ev.add_argument(
        "--benchmarks",
        nargs="+",
        required=True,
        metavar="NAME",
        help="humaneval | gym:TASK (reasoning-gym, eval seed) | FILE.jsonl/.parquet | a dataset folder (test split)",
    )
    ev.add_argument("--limit", type=int, help="problems per benchmark (the first N)")
    ev.add_argument("--samples", type=int, help="k completions per problem (default 4)")
    ev.add_argument("--seed", type=int, help="engine seed (default 0): same model and seed, same samples")
    ev.add_argument("--max-tokens", dest="max_tokens", type=int, help="new tokens per completion (default 2048)")
    ev.add_argument("--output", help="report folder (default runs/eval)")
    ev.add_argument(
        "--exclude-prompts-from",
        dest="exclude_prompts_from",
        action="append",
        metavar="DATASET",
        help="drop benchmark problems whose prompt is in this dataset's train split (repeatable)",
    )
    ev.add_argument("--backend", choices=["vllm", "openai", "vllm-server"], help="how completions are produced")
    ev.add_argument("--endpoint", dest="endpoints", action="append", help="openai backend: base URL (repeatable)")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    run = sub.add_parser(
        "run",
        help="run generate -> verify -> build -> student init -> sft -> eval from one recipe, resuming",
        description=(
            "Run every stage a recipe names, in order. A stage whose output is complete and whose inputs (its part"
            " of the recipe and the stages before it) are unchanged is skipped, so a run that stopped resumes"
            " where it stopped; an interrupted SFT resumes from its last checkpoint. The stage log is"
            " RUNS_DIR/NAME/run.log."
        ),
        epilog="example: distill run --config recipes/demo-run.yaml",
    )
    run.add_argument(
        "--config",
        type=Path,
        required=True,
        help="run recipe (YAML): a generate recipe plus student, sft and eval sections",
    )
    run.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="e.g. sampling.n=2 eval.limit=10")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    student = sub.add_parser("student", help="make student models", description="Student initialization.")
    student_sub = student.add_subparsers(dest="student_command", required=True, metavar="ACTION")
    init = student_sub.add_parser(
        "init",
        help="keep K decoder layers of a teacher as the student's starting point",
        description="Prune a teacher (Llama/Qwen2 family) to K decoder layers and save a loadable model folder.",
        epilog="example: distill student init --from smollm2-135m-instruct --layers 8 --output runs/students/smol-8",
    )
    init.add_argument("--from", dest="teacher", required=True, help="teacher model folder or the embedded alias")
    init.add_argument("--layers", type=int, required=True, help="decoder layers to keep")
    init.add_argument("--output", type=Path, required=True, help="folder to write (must not exist)")
    init.add_argument(
        "--strategy",
        choices=["even", "first"],
        default="even",
        help="evenly spaced layers (first and last kept) or the first K",
    )

    models = sub.add_parser("models", help="prepare and list teacher models", description="Model cache tools.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    prepare = models_sub.add_parser(
        "prepare", help="convert the embedded SmolLM2-135M-Instruct GGUF into a safetensors folder (once)"
    )
    prepare.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _raise_interrupt)  # finally blocks run: parts flushed, servers stopped
    if argv[:1] == ["sft"]:  # TRL's parser owns the sft command line (--config, --output_dir, any SFTConfig field)
        return _sft(argv[1:])
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # FIELD=VALUE after a flag (`generate RECIPE --status executor.shards=4`): argparse leaves it over
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "student":
        from sft.prune import prune_layers

        print(prune_layers(args.teacher, args.layers, args.output, strategy=args.strategy))
        return 0
    if args.command == "models":
        from pipeline.models import prepare_embedded

        print(prepare_embedded(force=args.force))
        return 0

    from pipeline.config import load_recipe
    from pipeline.config_base import RecipeError
    from pipeline.executor import ShardBusy
    from pipeline.executor_config import make_executor

    if args.command in ("eval", "run"):
        return _eval_or_run(args)
    if args.command == "generate" and args.quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        if args.command in ("generate", "verify"):
            args.overrides = [o for item in args.overrides for o in _expand_shard(item)]
        if args.command == "verify":
            return _verify(args)
        if args.command in ("build", "stats", "publish"):
            return _dataset_command(args)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.status:
            from pipeline.generate.status import print_status

            return print_status(recipe)
        from pipeline.generate.stage import generate

        stats = generate(recipe, quiet=args.quiet)
        if recipe.verify.inline and not args.no_verify:
            from pipeline.verify.stage import verify_run

            # the shards this command generated: one array task verifies its own shard's parts
            executor = make_executor(recipe.executor)
            verdicts = verify_run(recipe.run_dir, recipe.verify, quiet=args.quiet, executor=executor)
            stats["infra_errors"] += verdicts["infra_error"]
    except ShardBusy as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except (RecipeError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; finished problems are saved, re-run the same command to resume", file=sys.stderr)
        return 130
    if stats["infra_errors"]:
        print(
            f"distill: {stats['infra_errors']} problems or verdicts failed on infrastructure errors (see stats.json); "
            "re-run the same command to retry them",
            file=sys.stderr,
        )
        return 3
    return 0


def _expand_shard(item: str) -> list[str]:
    """`shard=I/N` stands for the overrides executor.shard=I executor.shards=N; any other item is itself."""
    from pipeline.executor_config import parse_shard_override

    return parse_shard_override(item.partition("=")[2]) if item.startswith("shard=") else [item]


def _sft(argv: list[str]) -> int:
    from sft.lint import LintError
    from sft.train import main as sft_main

    try:
        return sft_main(argv)
    except (LintError, ValueError, FileNotFoundError) as e:
        print(f"distill sft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill sft: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def _eval_or_run(args) -> int:
    from pipeline.config_base import RecipeError

    try:
        if args.command == "run":
            from pipeline.run import load_run_recipe, run

            return run(load_run_recipe(args.config, args.overrides), quiet=args.quiet)
        from eval.config import EvalConfig
        from eval.evaluate import evaluate
        from pipeline.config import validate

        fields = {k: v for k, v in vars(args).items() if k in EvalConfig.model_fields and v is not None}
        if args.backend or args.endpoints:
            backend = args.backend or "openai"
            fields["engine"] = {"backend": backend, "endpoints": args.endpoints or [], "reproducible": True}
        report = evaluate(validate(EvalConfig, fields, "eval settings"), quiet=args.quiet)
    except (RecipeError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    print(f"report: {Path(report['output']) / 'report.md'}")
    if report["needs_retry"]:
        failed = {m: report["incomplete"][m] for m in report["needs_retry"]}
        print(f"distill eval: infrastructure errors {failed}; re-run the same command to retry", file=sys.stderr)
        return 3
    return 0


def _dataset_command(args) -> int:
    if args.command == "stats":
        from pipeline.build.card import print_stats
        from pipeline.build.shards import check_dataset

        print_stats(args.dataset)
        if args.check:
            problems = check_dataset(args.dataset)
            for problem in problems:
                print(f"distill stats --check: {problem}", file=sys.stderr)
            print("all shards match manifest.json" if not problems else f"{len(problems)} problem(s) found")
            return 1 if problems else 0
        return 0
    if args.command == "publish":
        from pipeline.build.publish import publish

        publish(args.dataset, args.repo_id, private=not args.public, dry_run=args.dry_run)
        return 0
    import yaml

    from pipeline.build.stage import build
    from pipeline.config import load_recipe
    from pipeline.verify.stage import verify_hash

    run_folder = args.target.is_dir()
    recipe = load_recipe(args.target / "recipe.yaml" if run_folder else args.target, args.overrides)
    run_dir = args.target if run_folder else recipe.run_dir
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    vhash = verify_hash(recipe.verify)  # the verdicts must be the recipe's: refused when verified otherwise
    stats = build(run_dir, recipe.build, Path(recipe.base_dir), recipe_yaml, quiet=args.quiet, verify_hash=vhash)
    if not args.quiet:
        from pipeline.build.card import print_stats

        print_stats(run_dir / "dataset")
    if not stats["kept"]:
        print(f"distill: warning: no row was kept (see {run_dir / 'build_exclusions.parquet'})", file=sys.stderr)
    return 0


def _verify(args) -> int:
    from pipeline.config import VerifyConfig, apply_overrides, load_recipe, validate
    from pipeline.config_base import RecipeError
    from pipeline.executor_config import make_executor
    from pipeline.verify.stage import verify_file, verify_run

    if args.input or args.output:
        # argparse puts a first FIELD=VALUE in `target`: file mode has no run folder, so it is an override too
        overrides = [str(args.target), *args.overrides] if args.target else args.overrides
        if not (args.input and args.output):
            raise RecipeError("file mode needs both --input and --output")
        data = apply_overrides({}, overrides)
        if set(data) - {"verify"}:
            raise RecipeError("file mode takes only verify.* overrides")
        cfg = validate(VerifyConfig, data.get("verify", {}), "verify settings", prefix="verify.")
        stats = verify_file(args.input, args.output, cfg, quiet=args.quiet)
    else:
        if args.target is None:
            raise RecipeError("give a run folder or a recipe (or --input/--output for file mode)")
        run_folder = args.target.is_dir()
        recipe = load_recipe(args.target / "recipe.yaml" if run_folder else args.target, args.overrides)
        run_dir = args.target if run_folder else recipe.run_dir
        stats = verify_run(run_dir, recipe.verify, quiet=args.quiet, executor=make_executor(recipe.executor))
    if not args.quiet:  # the summary, without the long per-reason breakdown kept in stats.json
        print(json.dumps({k: v for k, v in stats.items() if k != "reasons"}, indent=2))
    return 3 if stats.get("infra_error") else 0


if __name__ == "__main__":
    sys.exit(main())
