"""A built dataset turned into the exact token rows the student trains on.

We tokenize ourselves rather than let TRL do it, so that nothing is truncated behind the user's back (TRL's default
`max_length` is 1024 and it truncates, then drops fully masked rows, silently), so that every dropped row is written
down with its reason, and so that the per-token loss weights line up with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

# Columns a training row carries into the trainer. `token_weight` is w / n on the n loss tokens of a sample of weight
# w, 0 elsewhere: summing it over any batch gives the batch's total sample weight (sft/losses.py).
TRAIN_COLUMNS = ["problem_id", "input_ids", "completion_mask", "token_weight", "length"]


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
    out = {"input_ids": [], "completion_mask": [], "token_weight": [], "length": 0, "reason": ""}
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
        token_weight=[0.0] * len(prompt_ids) + [weight / n] * n if n else [0.0] * len(ids),
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


def _keeps_think(trained_text: str, answer: str) -> bool:
    reasoning = answer.split("<think>", 1)[1].split("</think>", 1)[0].strip()
    return "<think>" in trained_text and "</think>" in trained_text and reasoning in trained_text


def tokenize_split(
    rows: datasets.Dataset, tokenizer, max_length: int | None, weighted: bool, num_proc: int | None = None
) -> TokenizedSplit:
    """Tokenize conversations into prompt + completion tokens, with the loss on the completion only."""
    mapped = rows.map(
        _tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "weighted": weighted, "max_length": max_length},
        num_proc=num_proc,
        desc="Tokenizing conversations",
    )
    reasons = mapped["reason"]
    ids = mapped["problem_id"] if "problem_id" in mapped.column_names else [f"row-{i}" for i in range(len(mapped))]
    samples = mapped["sample_index"] if "sample_index" in mapped.column_names else [None] * len(mapped)
    excluded = [
        {"row": i, "problem_id": ids[i], "sample_index": samples[i], "reason": r} for i, r in enumerate(reasons) if r
    ]
    keep = [i for i, r in enumerate(reasons) if not r]
    if "problem_id" not in mapped.column_names:
        mapped = mapped.add_column("problem_id", ids)
    return TokenizedSplit(rows=mapped.select(keep).select_columns(TRAIN_COLUMNS), excluded=excluded, total=len(rows))
