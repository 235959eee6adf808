"""The `distill` command: one subcommand per stage of the data path (DESIGN.md). `distill SUBCOMMAND --help`."""

from __future__ import annotations

import argparse
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
        epilog="example: distill generate recipes/demo.yaml sampling.n=4 teacher.backend=vllm-server name=demo-n4",
    )
    gen.add_argument("recipe", nargs="?", type=Path, default=DEMO_RECIPE, help=f"YAML recipe (default: {DEMO_RECIPE})")
    gen.add_argument(
        "overrides",
        nargs="*",
        metavar="FIELD=VALUE",
        help="override any recipe field, dotted, value parsed as YAML: sampling.n=4 'teacher.endpoints=[URL]'",
    )
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary (batch jobs)")

    models = sub.add_parser("models", help="prepare and list teacher models", description="Model cache tools.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    prepare = models_sub.add_parser(
        "prepare", help="convert the embedded SmolLM2-135M-Instruct GGUF into a safetensors folder (once)"
    )
    prepare.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # finally blocks run: parts flushed, servers stopped
    if args.command == "models":
        from pipeline.models import prepare_embedded

        print(prepare_embedded(force=args.force))
        return 0

    from pipeline.config import RecipeError, load_recipe

    if args.quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from pipeline.generate import generate

        stats = generate(recipe, quiet=args.quiet)
    except (RecipeError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; finished problems are saved, re-run the same command to resume", file=sys.stderr)
        return 130
    if stats["infra_errors"]:
        print(
            f"distill: {stats['infra_errors']} problems failed on infrastructure errors (see stats.json); "
            "re-run the same command to retry them",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
