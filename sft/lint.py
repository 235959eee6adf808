"""Checks run before training, for mistakes that silently ruin distilled students in other tools.

- The end-of-turn token must be in the labels: a collator that masks the pad token also masks EOS when the two are
  the same token (SmolLM2, Llama 3), and the student then never learns to stop.
- No sample may be truncated: a reasoning trace cut in the middle teaches the student to stop mid-thought.
- The chat template must keep the `<think>` block: some distill templates strip it from assistant turns.
- Every sample must have loss tokens: an empty mask means the template ate the answer.
"""

from __future__ import annotations

from collections import Counter

from sft.data import TokenizedSplit, end_of_turn_id

# Reasons that mean the recipe or the template is wrong, not the row: training stops.
FATAL_REASONS = {
    "empty_loss_mask": "the chat template leaves no assistant tokens to train on",
    "template_prefix_mismatch": "the chat template renders the prompt differently once the answer follows it",
    "think_block_stripped": "the chat template removes the <think> block from the training text",
    "no_teacher_topk": "the dataset has no stored top-k for these rows: kd_source=stored needs a run generated with "
    "sampling.teacher_topk",
    "teacher_tokenizer_mismatch": "the teacher's stored token ids decode to other text with the student's tokenizer: "
    "sparse KD (kd_source=stored) needs a student that shares the teacher's tokenizer",
}


class LintError(RuntimeError):
    """Training would silently learn the wrong thing; the message says what and which rows."""


def end_of_turn_token(tokenizer) -> tuple[int, str]:
    """The end-of-turn token's id and text."""
    token_id = end_of_turn_id(tokenizer)
    return token_id, tokenizer.convert_ids_to_tokens(token_id)


def lint_rows(split: TokenizedSplit, overlong: str, max_length: int | None) -> dict:
    """Count every excluded row by reason; raise on reasons that no row-level drop can fix."""
    reasons = Counter(e["reason"] for e in split.excluded)
    report = {
        "rows_in": split.total,
        "rows_trained": len(split.rows),
        "excluded": dict(reasons),
        "max_length": max_length,
        "overlong_policy": overlong,
    }
    errors = [
        f"{n} row(s): {FATAL_REASONS[r]} (e.g. problem {_first(split, r)})"
        for r, n in reasons.items()
        if r in FATAL_REASONS
    ]
    if reasons["overlong"] and overlong == "fail":
        errors.append(
            f"{reasons['overlong']} row(s) are longer than max_length={max_length} tokens (e.g. problem "
            f"{_first(split, 'overlong')}): raise max_length, or set overlong=drop to train without them"
        )
    if not len(split.rows) and not errors:
        errors.append("no row left to train on")
    if errors:
        raise LintError("lint before training failed:\n  " + "\n  ".join(errors))
    return report


def lint_collated(trainer, eot_id: int, eot_token: str, max_rows: int = 64) -> int:
    """Run the trainer's own collator on single rows and require the end-of-turn token among the labels."""
    rows = trainer.train_dataset.select(range(min(max_rows, len(trainer.train_dataset))))
    missing = []
    for i, row in enumerate(rows):
        labels = trainer.data_collator([row])["labels"]
        if not (labels == eot_id).any():
            missing.append(i)
    if missing:
        raise LintError(
            f"the end-of-turn token {eot_token} (id {eot_id}) is masked out of the labels in {len(missing)} of "
            f"{len(rows)} checked rows: the student would never learn to stop (is the pad token equal to it and "
            "masked by the collator?)"
        )
    return len(rows)


def _first(split: TokenizedSplit, reason: str) -> str:
    return next(str(e["problem_id"]) for e in split.excluded if e["reason"] == reason)
