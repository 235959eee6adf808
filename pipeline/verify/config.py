"""Typed configuration of the verify stage (recipe section `verify`), one class per verifier and one for filters."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from pipeline.config_base import Strict

FILTER_NAMES = (
    "truncated",
    "malformed_think",
    "language_mixing",
    "repetition",
    "long_paragraph",
    "code_in_math_reasoning",
    "length_bounds",
)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class MathConfig(Strict):
    timeout_s: float = Field(5.0, gt=0, description="hard deadline per sample; the worker is killed past it")
    workers: int = Field(default_factory=default_workers, ge=1, description="worker processes (default: all cores)")


class CodeConfig(Strict):
    isolation: Literal["auto", "bwrap", "rlimit"] = Field(
        "auto", description="auto and bwrap: bubblewrap, refused where it cannot run; rlimit: the weaker fallback"
    )
    limits: Literal["auto", "cgroup", "per_process"] = Field(
        "auto", description="memory and process caps per sandbox (cgroup); auto: else per process; cgroup: required"
    )
    timeout_s: float = Field(
        10.0, gt=0, description="wall-clock deadline per program, killed past it; an overrun is retried once at 2x"
    )
    cpu_s: int = Field(10, ge=1, description="CPU seconds per program (RLIMIT_CPU)")
    memory_mb: int = Field(1024, ge=64, description="memory per sandbox (cgroup) and address space per process")
    max_processes: int = Field(64, ge=1, description="processes per sandbox (pids.max, RLIMIT_NPROC)")
    max_open_files: int = Field(64, ge=16, description="open files per program (RLIMIT_NOFILE)")
    max_output_bytes: int = Field(1_000_000, ge=1024, description="stdout/stderr kept; a program writing more fails")
    workers: int = Field(default_factory=default_workers, ge=1, description="programs run at once (default: cores)")


class FilterConfig(Strict):
    """DeepSeek-R1's quality filters; a row failing one keeps its verdict and lists the filter in failed_filters."""

    enabled: list[str] = Field(default_factory=lambda: list(FILTER_NAMES), description="filters to apply")
    min_completion_tokens: int = Field(1, ge=0, description="length_bounds: fewer generated tokens fail")
    max_completion_tokens: int | None = Field(None, ge=1, description="length_bounds: more generated tokens fail")
    repetition_ngram: int = Field(10, ge=2, description="repetition: words per n-gram")
    repetition_max_repeats: int = Field(5, ge=2, description="repetition: an n-gram seen this often is a loop")
    max_paragraph_chars: int = Field(4000, ge=100, description="long_paragraph: longer paragraphs fail")
    language_min_chars: int = Field(40, ge=1, description="language_mixing: shorter reasoning is not judged")


class VerifyConfig(Strict):
    inline: bool = Field(True, description="distill generate verifies its run when generation ends")
    math: MathConfig = MathConfig()
    code: CodeConfig = CodeConfig()
    filters: FilterConfig = FilterConfig()
