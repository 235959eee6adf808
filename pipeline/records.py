"""The data contract: the record types that flow between stages, their column names and their Parquet schemas.

Every stage and the eval take their column names from `Col` here, and the schemas below are built from the same
names, so a column renamed or added in one place cannot drift from the code that reads or writes it.
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


class Col:
    """The name of every column of raw and verified parts, the training set and a build's test problems.

    Plain str constants in a namespace rather than an Enum: they go straight into dict keys, pyarrow schemas and
    `columns=` lists, where an Enum member would need `.value` at every use.
    """

    # A problem, as the teacher saw it.
    PROBLEM_ID = "problem_id"
    SAMPLE_INDEX = "sample_index"
    SOURCE = "source"
    DOMAIN = "domain"
    PROMPT = "prompt"
    REFERENCE = "reference"
    METADATA = "metadata"
    MESSAGES = "messages"
    # The teacher's completion.
    COMPLETION = "completion"
    REASONING = "reasoning"
    ANSWER = "answer"
    FINISH_REASON = "finish_reason"
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    MEAN_TOKEN_ENTROPY = "mean_token_entropy"
    ENTROPY_TOP_K = "entropy_top_k"
    LATENCY_S = "latency_s"
    # Sparse KD (`sampling.teacher_topk: K`; all null when K = 0): the teacher's own sampled token ids of the
    # completion, and its K most likely tokens at each of those positions, flattened row-major [tokens x K].
    COMPLETION_TOKEN_IDS = "completion_token_ids"
    TOPK_TOKEN_IDS = "topk_token_ids"
    TOPK_LOGPROBS = "topk_logprobs"
    TEACHER_TOPK = "teacher_topk"
    # Provenance.
    TEACHER = "teacher"
    TEACHER_REVISION = "teacher_revision"
    ENGINE = "engine"
    ENGINE_VERSION = "engine_version"
    TEMPLATE_HASH = "template_hash"
    SAMPLING = "sampling"
    SAMPLING_HASH = "sampling_hash"
    CONFIG_HASH = "config_hash"
    CREATED_AT = "created_at"
    # The verdict.
    VERIFIER = "verifier"
    STATUS = "status"
    PASSED = "passed"
    REASON = "reason"
    VERDICT_DETAIL = "verdict_detail"
    FAILED_FILTERS = "failed_filters"
    VERIFY_HASH = "verify_hash"
    # The training set's per-problem signals and weight.
    PASS_RATE = "pass_rate"
    ANSWER_AGREEMENT = "answer_agreement"
    WEIGHT = "weight"
    # A build's test problems.
    SAMPLES = "samples"
    TEACHER_PASS_RATE = "teacher_pass_rate"


# One row per completion, kept or not. Provenance columns make rows of different settings distinguishable.
# What a raw row stores of its problem: an edited problem that kept its id has another digest of these.
CONTENT_COLUMNS = (Col.DOMAIN, Col.PROMPT, Col.REFERENCE, Col.METADATA)


def content_digest(domain: str, prompt: str, reference: str, metadata_json: str) -> str:
    """The digest of a problem's content as a raw row stores it (`CONTENT_COLUMNS`, metadata as its JSON text);
    computed for every problem of a resumed run, so a plain sha256 of the fields, not a JSON fingerprint."""
    text = "\x1f".join(str(v) for v in (domain, prompt, reference, metadata_json))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Sparse KD columns (`sampling.teacher_topk: K`), null in every row generated with K = 0. For a row of T completion
# tokens: `completion_token_ids` holds the T token ids the teacher sampled, in order, the final end-of-turn token
# included when the engine stopped on it (vLLM returns it in token_ids but not in the text); `topk_token_ids` and
# `topk_logprobs` hold T x K values, row-major (position t's K ids are [t*K, (t+1)*K)), most likely first: the ids and
# natural-log probabilities of the teacher's own distribution at temperature 1 (vLLM's raw_logprobs: before
# temperature, top-p and any logits processor), so log-probs are <= 0 and sort descending within each position.
# The sampled token need not be among them (a temperature above 0 may sample outside the top K). Log-probs are
# float16 (2 bytes; about 5e-4 relative error, so 0.005 at logprob -10), half the bytes of float32 on disk.
TOPK_LOGPROB_TYPE = pa.float16()
TOPK_FIELDS = [
    pa.field(Col.COMPLETION_TOKEN_IDS, pa.list_(pa.int32())),
    pa.field(Col.TOPK_TOKEN_IDS, pa.list_(pa.int32())),
    pa.field(Col.TOPK_LOGPROBS, pa.list_(TOPK_LOGPROB_TYPE)),
    pa.field(Col.TEACHER_TOPK, pa.int32()),  # K of this row, so the flattened layout is self-describing
]
TOPK_COLUMNS = tuple(f.name for f in TOPK_FIELDS)

RAW_SCHEMA = pa.schema(
    [
        (Col.PROBLEM_ID, pa.string()),
        (Col.SAMPLE_INDEX, pa.int32()),
        (Col.SOURCE, pa.string()),
        (Col.DOMAIN, pa.string()),
        (Col.PROMPT, pa.string()),
        (Col.REFERENCE, pa.string()),
        (Col.METADATA, pa.string()),  # JSON
        (Col.MESSAGES, pa.string()),  # JSON list of {role, content} sent to the teacher
        (Col.COMPLETION, pa.string()),  # the teacher's full text
        (Col.REASONING, pa.string()),
        (Col.ANSWER, pa.string()),
        (Col.FINISH_REASON, pa.string()),
        (Col.PROMPT_TOKENS, pa.int32()),
        (Col.COMPLETION_TOKENS, pa.int32()),
        (Col.MEAN_TOKEN_ENTROPY, pa.float64()),  # mean entropy (nats) of the renormalized top-k distribution
        (Col.ENTROPY_TOP_K, pa.int32()),  # K of that distribution, so h = H / log K can be computed later
        (Col.LATENCY_S, pa.float64()),  # seconds from submitting the request to its last token (all n samples)
        (Col.TEACHER, pa.string()),
        (Col.TEACHER_REVISION, pa.string()),
        (Col.ENGINE, pa.string()),
        (Col.ENGINE_VERSION, pa.string()),
        (Col.TEMPLATE_HASH, pa.string()),
        (Col.SAMPLING, pa.string()),  # JSON
        (Col.SAMPLING_HASH, pa.string()),
        (Col.CONFIG_HASH, pa.string()),
        (Col.CREATED_AT, pa.timestamp("ms", tz="UTC")),
        *TOPK_FIELDS,  # last: the bulk of a row's bytes when present
    ]
)

# Added by `distill verify`: the verdict, why, and which quality filters the completion failed.
VERDICT_FIELDS = [
    pa.field(Col.VERIFIER, pa.string()),
    pa.field(Col.STATUS, pa.string()),  # passed | failed | infra_error (retried next run) | data_fault (final)
    pa.field(Col.PASSED, pa.bool_()),
    pa.field(Col.REASON, pa.string()),
    pa.field(Col.VERDICT_DETAIL, pa.string()),  # JSON
    pa.field(Col.FAILED_FILTERS, pa.list_(pa.string())),
    pa.field(Col.VERIFY_HASH, pa.string()),  # fingerprint of the verify settings that produced the verdict
]
VERIFIED_SCHEMA = pa.schema([*RAW_SCHEMA, *VERDICT_FIELDS])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# The training set: one row per kept completion, loadable with `datasets.load_dataset("parquet", data_dir=...)` and
# with plain pyarrow. The assistant turn of `messages` holds the whole trace, so SFT needs no other column; the rest
# is provenance, the per-problem signals, and `weight`, the per-sample loss weight.
DATASET_SCHEMA = pa.schema(
    [
        (Col.PROBLEM_ID, pa.string()),
        (Col.SOURCE, pa.string()),
        (Col.DOMAIN, pa.string()),
        (Col.PROMPT, pa.string()),
        (Col.MESSAGES, pa.list_(MESSAGE)),  # the prompt turns, then "<think>\n...\n</think>\n\nanswer"
        (Col.REASONING, pa.string()),
        (Col.ANSWER, pa.string()),
        (Col.REFERENCE, pa.string()),
        (Col.VERIFIER, pa.string()),
        (Col.PASSED, pa.bool_()),
        (Col.FAILED_FILTERS, pa.list_(pa.string())),
        (Col.FINISH_REASON, pa.string()),
        (Col.PROMPT_TOKENS, pa.int32()),
        (Col.COMPLETION_TOKENS, pa.int32()),
        (Col.MEAN_TOKEN_ENTROPY, pa.float64()),
        (Col.PASS_RATE, pa.float64()),
        (Col.ANSWER_AGREEMENT, pa.float64()),
        (Col.WEIGHT, pa.float64()),  # normalized to mean 1 over the dataset
        (Col.TEACHER, pa.string()),
        (Col.SAMPLING, pa.string()),  # JSON
        (Col.SAMPLE_INDEX, pa.int32()),
        (Col.CONFIG_HASH, pa.string()),
        *TOPK_FIELDS,  # sparse KD: the assistant turn as the teacher's token ids, with its top-k (see TOPK_FIELDS)
    ]
)

# A build's `test_problems.parquet`: one row per test problem, whatever became of its samples (solved or not), so
# that an evaluation of the build is not limited to what the teacher solved.
TEST_PROBLEMS_SCHEMA = pa.schema(
    [
        (Col.PROBLEM_ID, pa.string()),
        (Col.SOURCE, pa.string()),
        (Col.DOMAIN, pa.string()),
        (Col.PROMPT, pa.string()),
        (Col.REFERENCE, pa.string()),
        (Col.METADATA, pa.string()),  # JSON
        (Col.SAMPLES, pa.int32()),
        (Col.TEACHER_PASS_RATE, pa.float64()),  # null when no sample was judged
    ]
)
