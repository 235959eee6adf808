"""Held-out loss of a model on the completions of a dataset split: the number that says whether a student learned
the teacher's answers rather than memorized its training rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import resolve_model
from sft.data import load_split, tokenize_split


@torch.no_grad()
def completion_loss(model: str, dataset: str, split: str = "test", batch_size: int = 8) -> float:
    """Mean cross-entropy per completion token (the prompt is context, not scored), one row at a time per batch."""
    path = resolve_model(model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = tokenize_split(load_split(dataset, split), tokenizer, max_length=None, weighted=False).rows
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids in batch["input_ids"])
        ids = torch.zeros(len(batch["input_ids"]), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for i, (row_ids, mask) in enumerate(zip(batch["input_ids"], batch["completion_mask"], strict=True)):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            attention[i, : len(row_ids)] = 1
            scored[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        logits = lm(input_ids=ids, attention_mask=attention).logits[:, :-1]
        target, keep = ids[:, 1:], scored[:, 1:]
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / max(count, 1)
