"""The data contract: the record types that flow between stages and the Parquet schema of raw parts.

Every stage imports its column names from here, so no stage invents its own (DESIGN.md, "Dataset contract").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

DOMAINS = ("math", "code", "mcq", "gym", "text")

# A verdict's status. `infra_error` (a broken sandbox or worker) is retried by the next verify run; `data_fault` (a
# reference no verifier can read or score) is final and never trained on; neither is ever a wrong answer.
PASSED, FAILED, INFRA_ERROR, DATA_FAULT = "passed", "failed", "infra_error", "data_fault"
STATUSES = (PASSED, FAILED, INFRA_ERROR, DATA_FAULT)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Problem:
    """One task for the teacher. `id` is stable across runs because resume and dedup key on it."""

    id: str
    source: str
    domain: str
    prompt: str
    reference: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def stable_id(source: str, *content: str) -> str:
    """A content hash for rows that carry no id of their own: the same row gets the same id on every run."""
    digest = hashlib.sha256("\x1f".join((source, *content)).encode()).hexdigest()
    return f"{source}-{digest[:16]}"


def fingerprint(obj: Any) -> str:
    """Short sha256 of a JSON-able object with sorted keys: equal settings give equal hashes on every machine."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_reasoning(text: str, reasoning_field: str | None = None, think_opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer): only the text after the think block is the answer, so a tentative answer inside the
    thinking is never judged as the model's conclusion.

    The engine's reasoning field wins when it gave one. Otherwise the block ends at the last closing tag; a completion
    that opened a block and never closed it (a truncated trace) has no answer at all. The block is opened either by a
    `<think>` in the text or by the chat template itself (`think_opened`: the prompt ended with `<think>`, so the text
    carries only the closing tag). Text without tags from a prompt that opened nothing is all answer. Malformed blocks
    are left for the verify stage's filters to judge, not repaired here.
    """
    if reasoning_field:
        return reasoning_field.strip(), text.strip()
    head, close, tail = text.rpartition(THINK_CLOSE)
    if close and THINK_OPEN not in tail:
        reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return reasoning.strip(), tail.strip()
    if THINK_OPEN in text:  # opened (or opened again after the last close) and never closed
        return text.replace(THINK_OPEN, "", 1).strip(), ""
    if think_opened:
        return text.strip(), ""
    return "", text.strip()


# One row per completion, kept or not. Provenance columns make rows of different settings distinguishable.
RAW_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_index", pa.int32()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("metadata", pa.string()),  # JSON
        ("messages", pa.string()),  # JSON list of {role, content} sent to the teacher
        ("completion", pa.string()),  # the teacher's full text
        ("reasoning", pa.string()),
        ("answer", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("mean_token_entropy", pa.float64()),  # mean entropy (nats) of the renormalized top-k distribution
        ("entropy_top_k", pa.int32()),  # K of that distribution, so h = H / log K can be computed later
        ("latency_s", pa.float64()),  # seconds from submitting the request to its last token (all n samples)
        ("teacher", pa.string()),
        ("teacher_revision", pa.string()),
        ("engine", pa.string()),
        ("engine_version", pa.string()),
        ("template_hash", pa.string()),
        ("sampling", pa.string()),  # JSON
        ("sampling_hash", pa.string()),
        ("config_hash", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)

# Added by `distill verify`: the verdict, why, and which quality filters the completion failed.
VERDICT_FIELDS = [
    pa.field("verifier", pa.string()),
    pa.field("status", pa.string()),  # passed | failed | infra_error (retried next run) | data_fault (final)
    pa.field("passed", pa.bool_()),
    pa.field("reason", pa.string()),
    pa.field("verdict_detail", pa.string()),  # JSON
    pa.field("failed_filters", pa.list_(pa.string())),
    pa.field("verify_hash", pa.string()),  # fingerprint of the verify settings that produced the verdict
]
VERIFIED_SCHEMA = pa.schema([*RAW_SCHEMA, *VERDICT_FIELDS])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# The training set (DESIGN.md, "Dataset contract"): one row per kept completion.
DATASET_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.list_(MESSAGE)),  # the prompt turns, then "<think>\n...\n</think>\n\nanswer"
        ("reasoning", pa.string()),
        ("answer", pa.string()),
        ("reference", pa.string()),
        ("verifier", pa.string()),
        ("passed", pa.bool_()),
        ("failed_filters", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("mean_token_entropy", pa.float64()),
        ("pass_rate", pa.float64()),
        ("answer_agreement", pa.float64()),
        ("weight", pa.float64()),  # normalized to mean 1 over the dataset
        ("teacher", pa.string()),
        ("sampling", pa.string()),  # JSON
        ("sample_index", pa.int32()),
        ("config_hash", pa.string()),
    ]
)

# A build's `test_problems.parquet`: one row per test problem, whatever became of its samples (solved or not), so
# that an evaluation of the build is not limited to what the teacher solved.
TEST_PROBLEMS_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("source", pa.string()),
        ("domain", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("metadata", pa.string()),  # JSON
        ("samples", pa.int32()),
        ("teacher_pass_rate", pa.float64()),  # null when no sample was judged
    ]
)
