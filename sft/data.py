"""A built dataset turned into the exact token rows the student trains on.

We tokenize ourselves rather than let TRL do it, so that nothing is truncated behind the user's back (TRL's default
`max_length` is 1024 and it truncates, then drops fully masked rows, silently), so that every dropped row is written
down with its reason, and so that the per-token loss weights line up with the tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import Col

# Columns a training row carries into the trainer. `sample_weight` is the sample's weight w (1 unweighted); the
# collator spreads it as w / n over the n loss tokens (sft/trainer.py), so summing token weights over any batch gives
# the batch's total sample weight (sft/losses.py). One float per sample, not one per token, is stored and cached.
TRAIN_COLUMNS = ["problem_id", "input_ids", "completion_mask", "sample_weight", "length"]
# With sparse KD: the teacher's top-k of each completion token, flattened [tokens x K] (pipeline/records.py).
TOPK_TRAIN_COLUMNS = [Col.TOPK_TOKEN_IDS, Col.TOPK_LOGPROBS, Col.TEACHER_TOPK]
_MARKER = "\x00distill-answer\x00"
TOKENIZE_VERSION = 1  # part of the cache key: raise it when what a row tokenizes to changes


@dataclass
class TokenizedSplit:
    rows: datasets.Dataset  # the rows kept for training
    excluded: list[dict]  # {"problem_id", "sample_index", "reason"} for every row that is not trained on
    total: int


def load_split(dataset: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Read one split of a `distill build` folder (only the shards named by the layout) or of a Hub dataset."""
    folder = Path(dataset)
    if folder.is_dir():
        files = sorted((folder / "data").glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{folder}/data has no {split}-*.parquet shards: is it a `distill build` folder?")
        rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    else:
        rows = datasets.load_dataset(dataset, split=split)
    missing = {"messages"} - set(rows.column_names)
    if missing:
        raise ValueError(f"dataset {dataset}: no column {sorted(missing)}; expected the distill dataset contract")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return rows


def _tokenize_row(row: dict, tokenizer, weighted: bool, max_length: int | None) -> dict:
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    out = {"input_ids": [], "completion_mask": [], "sample_weight": 1.0, "length": 0, "reason": ""}
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        out["reason"] = "no_assistant_turn"
        return out
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    prompt_ids, ids = prompt["input_ids"], full["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        # The template renders the prompt differently once an answer follows it: no prefix marks the answer.
        out["reason"] = "template_prefix_mismatch"
        return out
    n = len(ids) - len(prompt_ids)
    weight = 1.0 if not weighted or row.get("weight") is None else float(row["weight"])  # 0 is a real weight
    out.update(
        input_ids=ids,
        completion_mask=[0] * len(prompt_ids) + [1] * n,
        sample_weight=weight,
        length=len(ids),
    )
    answer = messages[-1]["content"]
    if n == 0:
        out["reason"] = "empty_loss_mask"
    elif "<think>" in answer and not _keeps_think(
        tokenizer.decode(ids[-n:], clean_up_tokenization_spaces=False), answer
    ):
        out["reason"] = "think_block_stripped"
    elif max_length is not None and len(ids) > max_length:
        out["reason"] = "overlong"
    return out


def _tokenize_teacher_tokens(*values, columns: list[str], tokenizer, weighted, max_length, eot_id) -> dict:
    """Sparse KD (`kd_source: stored`): the prompt as the chat template renders it, then the teacher's own sampled
    token ids, each with the teacher's top-k at the position that generated it (the top-k columns stay in the
    dataset as they are, Arrow, never Python objects: 32k tokens x 20 are 1.3M values a row). Re-tokenizing the text
    could split it differently, and the stored top-k would then describe other tokens."""
    row = dict(zip(columns, values, strict=True))
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    out = {"input_ids": [], "completion_mask": [], "sample_weight": 1.0, "length": 0, "reason": ""}
    tokens = row.get(Col.COMPLETION_TOKEN_IDS)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        out["reason"] = "no_assistant_turn"
        return out
    if not tokens or not row.get(Col.TEACHER_TOPK):
        out["reason"] = "no_teacher_topk"  # generated without sampling.teacher_topk
        return out
    prompt_ids = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = list(prompt_ids) + list(tokens)
    weight = 1.0 if not weighted or row.get("weight") is None else float(row["weight"])
    out.update(
        input_ids=ids,
        completion_mask=[0] * len(prompt_ids) + [1] * len(tokens),
        sample_weight=weight,
        length=len(ids),
    )
    # The teacher's ids must mean the same text to the student: a tokenizer that differs decodes them differently.
    decoded = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if max(tokens) >= len(tokenizer) or (row.get(Col.ANSWER) or "").strip() not in decoded:
        out["reason"] = "teacher_tokenizer_mismatch"
    elif tokens[-1] != eot_id:
        out["reason"] = "teacher_tokens_unterminated"  # cut at max_tokens: the student would not learn to stop
    elif max_length is not None and len(ids) > max_length:
        out["reason"] = "overlong"
    return out


def _keeps_think(trained_text: str, answer: str) -> bool:
    reasoning = answer.split("<think>", 1)[1].split("</think>", 1)[0].strip()
    return "<think>" in trained_text and "</think>" in trained_text and reasoning in trained_text


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokens of a conversation: the whole tokenizer (vocabulary, merges, normalizer, added tokens)
    and the chat template. Two tokenizers with the same fingerprint tokenize every row alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = (
        tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template)
    )
    return hashlib.sha256(f"{body}\0{template}\0{tokenizer.special_tokens_map}".encode()).hexdigest()


def tokenize_split(
    rows: datasets.Dataset,
    tokenizer,
    max_length: int | None,
    weighted: bool,
    num_proc: int | None = None,
    cache_dir: Path | None = None,
    teacher_tokens: bool = False,
) -> TokenizedSplit:
    """Tokenize conversations into prompt + completion tokens, with the loss on the completion only.

    With `cache_dir`, the tokenized rows are kept there under a key of the rows, the tokenizer and the settings: a
    resumed run, and every rank after the first (sft/train.py runs rank 0 first), reads them instead of tokenizing
    again; a different tokenizer, template, max_length or weighting gets a key of its own. `teacher_tokens`: train on
    the teacher's stored token ids and top-k (sparse KD) instead of the tokenized text."""
    cache_file = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        settings = [max_length, weighted, teacher_tokens, TRAIN_COLUMNS, TOKENIZE_VERSION]
        key = [rows._fingerprint, tokenizer_fingerprint(tokenizer), *settings]
        cache_file = str(cache_dir / f"tokenized-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.arrow")
    kwargs = {"tokenizer": tokenizer, "weighted": weighted, "max_length": max_length}
    light = None
    if teacher_tokens:
        light = [c for c in rows.column_names if c not in (Col.TOPK_TOKEN_IDS, Col.TOPK_LOGPROBS)]
        kwargs |= {"eot_id": end_of_turn_id(tokenizer), "columns": light}
    mapped = rows.map(
        _tokenize_teacher_tokens if teacher_tokens else _tokenize_row,
        fn_kwargs=kwargs,
        input_columns=light,
        num_proc=num_proc,
        desc="Tokenizing conversations",
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
    )
    reasons = mapped["reason"]
    if teacher_tokens:
        fits = _topk_fits(mapped)
        reasons = [r or ("" if ok else "no_teacher_topk") for r, ok in zip(reasons, fits, strict=True)]
    ids = mapped["problem_id"] if "problem_id" in mapped.column_names else [f"row-{i}" for i in range(len(mapped))]
    samples = mapped["sample_index"] if "sample_index" in mapped.column_names else [None] * len(mapped)
    excluded = [
        {"row": i, "problem_id": ids[i], "sample_index": samples[i], "reason": r} for i, r in enumerate(reasons) if r
    ]
    keep = [i for i, r in enumerate(reasons) if not r]
    if "problem_id" not in mapped.column_names:
        mapped = mapped.add_column("problem_id", ids)
    columns = TRAIN_COLUMNS + (TOPK_TRAIN_COLUMNS if teacher_tokens else [])
    return TokenizedSplit(rows=mapped.select(keep).select_columns(columns), excluded=excluded, total=len(rows))


def _topk_fits(rows: datasets.Dataset) -> list[bool]:
    """Per row, whether its stored top-k holds K entries for each of its tokens, counted in Arrow."""
    table = rows.data.table if hasattr(rows.data, "table") else rows.data
    tokens = pc.list_value_length(table.column(Col.COMPLETION_TOKEN_IDS))
    expected = pc.multiply(tokens, table.column(Col.TEACHER_TOPK).cast(pa.int64()))
    for name in (Col.TOPK_TOKEN_IDS, Col.TOPK_LOGPROBS):
        expected = pc.if_else(pc.equal(pc.list_value_length(table.column(name)), expected), expected, -1)
    return pc.fill_null(pc.greater(expected, 0), False).to_pylist()


def end_of_turn_id(tokenizer) -> int:
    """The special token the chat template writes after an assistant answer (`<|im_end|>`, `<|eot_id|>`, ...)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARKER}], tokenize=False
    )
    suffix_ids = tokenizer(text.split(_MARKER)[-1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return next((i for i in suffix_ids if i in special), tokenizer.eos_token_id)
