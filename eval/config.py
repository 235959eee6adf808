"""Typed configuration of `distill eval` (also the `eval` section of a `distill run` recipe)."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config_base import Strict
from pipeline.generate.config import SourceConfig, TeacherConfig
from pipeline.verify.config import FilterConfig, VerifyConfig

# reasoning-gym sets built in by name (`gym:TASK`) use this seed; training recipes use small seeds, and `distill run`
# refuses an eval seed equal to one of its training seeds. Problems that still coincide with a training prompt (small
# task spaces repeat) are removed by `exclude_prompts_from`.
EVAL_GYM_SEED = 1_000_003


class EvalConfig(Strict):
    """Which models answer which benchmarks, under DeepSeek-R1's protocol, and where the report goes."""

    models: list[str] = Field(
        min_length=1,
        description="model folders or the embedded alias, optionally LABEL=MODEL; the first is the reference "
        "(the teacher) for accuracy retention, speed-up and memory reduction",
    )
    benchmarks: list[str | SourceConfig] = Field(
        min_length=1,
        description="humaneval | gym:TASK | a JSONL/Parquet file with prompt, reference, domain | a dataset folder "
        "(its test split) | a source mapping as in a generate recipe",
    )
    limit: int | None = Field(None, ge=1, description="problems per benchmark (the first N); default: all")
    gym_size: int = Field(50, ge=1, description="problems of a gym:TASK benchmark when no limit is given")
    samples: int = Field(4, ge=1, description="k: completions per problem (pass@1 averages them, cons@k votes)")
    seed: int = Field(0, description="engine seed: the same model, seed and problems give the same samples")
    temperature: float = Field(0.6, ge=0, description="DeepSeek-R1's evaluation temperature")
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1, description="generated tokens per completion (a run uses its recipe's)")
    output: str = Field("runs/eval", description="folder of report.md, report.json, plots/ and the generations")
    exclude_prompts_from: list[str] = Field(
        default_factory=list,
        description="dataset folders (distill build outputs) whose training prompts are removed from the benchmarks",
    )
    engine: TeacherConfig = Field(
        default_factory=lambda: TeacherConfig(reproducible=True),
        description="backend settings as in a recipe's `teacher`; `model` is ignored",
    )
    # Accuracy needs verdicts only: quality filters would not change a score and cost time.
    verify: VerifyConfig = Field(default_factory=lambda: VerifyConfig(filters=FilterConfig(enabled=[])))

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, models: list[str]) -> list[str]:
        labels = [model_label(m)[0] for m in models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"two models share the label {', '.join(repeated)}: name them LABEL=MODEL")
        return models


def model_label(spec: str) -> tuple[str, str]:
    """(label, model) of `LABEL=MODEL` or of a bare model, labelled by its folder name."""
    label, sep, model = spec.partition("=")
    if sep:
        return label, model
    return spec.rstrip("/").rsplit("/", 1)[-1], spec
