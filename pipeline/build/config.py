"""Typed configuration of the build stage (recipe section `build`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config_base import Strict


class DecontaminationConfig(Strict):
    eval_sets: list[str] = Field(
        default_factory=list, description="JSONL/Parquet files of evaluation problems (relative to the recipe)"
    )
    field: str = Field("prompt", description="column holding the problem text in those files")
    n: int = Field(8, ge=1, description="word n-gram length; one shared n-gram removes a training row")


class StratifyConfig(Strict):
    enabled: bool = Field(False, description="mix head/torso/tail categories by the fractions below")
    fractions: list[float] = Field(default_factory=lambda: [0.7, 0.2, 0.1], min_length=3, max_length=3)

    @model_validator(mode="after")
    def _sum_to_one(self) -> StratifyConfig:
        if abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) < 0:
            raise ValueError("stratify.fractions must be three non-negative numbers summing to 1")
        return self


class BuildConfig(Strict):
    shard_mb: float = Field(256, gt=0, description="target size of one Parquet shard")
    seed: int = Field(0, description="order of rows and the test split; same seed, same dataset")
    max_per_problem: int = Field(4, ge=1, description="kept samples per problem (higher weight, then shorter)")
    beta: float = Field(1.0, gt=0, description="sample weight w = 1 - h^beta, h = normalized top-k entropy")
    weighting: Literal["sample", "sample_x_agreement", "uniform"] = Field("sample", description="weight formula")
    pass_rate_band: list[float] | None = Field(
        None, min_length=2, max_length=2, description="keep problems with lo < teacher pass rate < hi, e.g. [0.2, 0.8]"
    )
    exact_dedup: bool = Field(True, description="drop repeated normalized prompt + answer pairs")
    near_dup_threshold: float | None = Field(
        0.85, gt=0, le=1, description="MinHash Jaccard above which a prompt is a near duplicate; null: off"
    )
    test_fraction: float = Field(0.0, ge=0, lt=1, description="share of problems held out as the test split")
    license: str = Field("apache-2.0", description="license written into the dataset card")
    decontamination: DecontaminationConfig = DecontaminationConfig()
    stratify: StratifyConfig = StratifyConfig()
