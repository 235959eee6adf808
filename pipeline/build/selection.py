"""Which verified completions become training rows, and why each other one does not.

Works one problem at a time (a problem's samples always share a part), so memory holds one part, the dedup
digests and the MinHash index, never the whole run. Every dropped row gets exactly one reason, so that
rows in = kept + dropped, reason by reason, in the card.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from pipeline.build.config import BuildConfig
from pipeline.build.dedup import Decontaminator, ExactDedup, NearDuplicatePrompts, load_eval_texts
from pipeline.build.weighting import combine, normalized_entropy, pass_rate, problem_agreement, sample_weight
from pipeline.records import DATA_FAULT, INFRA_ERROR, PASSED, THINK_CLOSE, THINK_OPEN, TOPK_COLUMNS, Col

THINK_TEMPLATE = f"{THINK_OPEN}\n{{reasoning}}\n{THINK_CLOSE}\n\n{{answer}}"


def category(row: dict) -> str:
    """The unit of head/torso/tail mixing: a reasoning-gym task, else the source."""
    metadata = json.loads(row.get(Col.METADATA) or "{}")
    return str(metadata.get("task") or row[Col.SOURCE])


def _extracted(row: dict) -> str | None:
    return json.loads(row.get(Col.VERDICT_DETAIL) or "{}").get("extracted")


def _not_passed(row: dict) -> str:
    """The drop reason of a row without a pass; a data fault names its reason, so the card counts each kind."""
    if row[Col.STATUS] == DATA_FAULT:
        return f"data_fault:{row[Col.VERIFIER]}:{row[Col.REASON]}"
    return "infra_error" if row[Col.STATUS] == INFRA_ERROR else "not_passed"


# Columns a training row takes unchanged from its verified row; the others are made by `training_row`.
_CARRIED = (
    Col.PROBLEM_ID,
    Col.SOURCE,
    Col.DOMAIN,
    Col.PROMPT,
    Col.REASONING,
    Col.ANSWER,
    Col.REFERENCE,
    Col.VERIFIER,
    Col.PASSED,
    Col.FAILED_FILTERS,
    Col.FINISH_REASON,
    Col.PROMPT_TOKENS,
    Col.COMPLETION_TOKENS,
    Col.MEAN_TOKEN_ENTROPY,
    Col.TEACHER,
    Col.SAMPLING,
    Col.SAMPLE_INDEX,
    Col.CONFIG_HASH,
    *TOPK_COLUMNS,  # sparse KD; `distill build` attaches them as Arrow columns rather than through these dicts
)


def training_row(row: dict, rate: float | None, agreement: float | None, weight: float) -> dict:
    prompt_turns = (
        json.loads(row[Col.MESSAGES]) if row.get(Col.MESSAGES) else [{"role": "user", "content": row[Col.PROMPT]}]
    )
    assistant = THINK_TEMPLATE.format(reasoning=row[Col.REASONING].strip(), answer=row[Col.ANSWER].strip())
    return {
        **{k: row.get(k) for k in _CARRIED},
        Col.MESSAGES: [*prompt_turns, {"role": "assistant", "content": assistant}],
        Col.PASS_RATE: rate,
        Col.ANSWER_AGREEMENT: agreement,
        Col.WEIGHT: weight,
    }


class Selector:
    """Stateful across the run: dedup and near-duplicate indexes see every problem kept so far."""

    def __init__(self, cfg: BuildConfig, base_dir: Path):
        self.cfg = cfg
        self.drops: Counter[str] = Counter()
        self.exact = ExactDedup() if cfg.exact_dedup else None
        threshold = cfg.near_dup_threshold
        self.near = NearDuplicatePrompts(threshold=threshold, seed=cfg.seed) if threshold else None
        decon = cfg.decontamination
        eval_texts = [
            pair for path in decon.eval_sets for pair in load_eval_texts(_resolve(base_dir, path), decon.field)
        ]
        self.decontaminator = Decontaminator(eval_texts, n=decon.n) if eval_texts else None

    def select(self, rows: list[dict]) -> Iterator[tuple[dict, str | None]]:
        """(training row or the source row, drop reason or None) for every input row."""
        rows = sorted(rows, key=lambda r: (r[Col.PROBLEM_ID], r[Col.SAMPLE_INDEX]))
        for _, group in groupby(rows, key=lambda r: r[Col.PROBLEM_ID]):
            yield from self._problem(list(group))

    def _drop(self, row: dict, reason: str) -> tuple[dict, str]:
        self.drops[reason] += 1
        return row, reason

    def _problem(self, samples: list[dict]) -> Iterator[tuple[dict, str | None]]:
        rate = pass_rate([s[Col.STATUS] for s in samples])
        agreement = problem_agreement(samples[0][Col.DOMAIN], [_extracted(s) for s in samples])
        candidates = []
        for s in samples:
            if s[Col.STATUS] != PASSED:
                yield self._drop(s, _not_passed(s))
            elif s[Col.FAILED_FILTERS]:
                yield self._drop(s, f"failed_filter:{s[Col.FAILED_FILTERS][0]}")
            else:
                candidates.append(s)
        if not candidates:
            return
        problem_reason = self._problem_reason(candidates[0], rate)
        if problem_reason:
            for s in candidates:
                yield self._drop(s, problem_reason)
            return
        weighted = []
        for s in candidates:
            # The whole assistant turn counts as the answer: two reasoning paths to one final answer are both worth
            # training on; the same text twice is not.
            if self.exact and self.exact.seen(s[Col.PROMPT], f"{s[Col.REASONING]}\n{s[Col.ANSWER]}"):
                yield self._drop(s, "exact_duplicate")
                continue
            h = normalized_entropy(s.get(Col.MEAN_TOKEN_ENTROPY), s.get(Col.ENTROPY_TOP_K))
            weighted.append((combine(sample_weight(h, self.cfg.beta), agreement, rate, self.cfg.weighting), s))
        weighted.sort(key=lambda ws: (-ws[0], ws[1].get(Col.COMPLETION_TOKENS) or 0, ws[1][Col.SAMPLE_INDEX]))
        for rank, (weight, s) in enumerate(weighted):
            if rank >= self.cfg.max_per_problem:
                yield self._drop(s, "over_k_per_problem")
            else:
                yield training_row(s, rate, agreement, weight), None

    def _problem_reason(self, first: dict, rate: float | None) -> str | None:
        band = self.cfg.pass_rate_band
        if band and (rate is None or not band[0] < rate < band[1]):
            return "pass_rate_band"
        if self.decontaminator:
            hit = self.decontaminator.check(first[Col.PROMPT])
            if hit:
                return f"contaminated:{hit}"
        # reasoning-gym prompts share a long template around a few words: text similarity cannot tell them apart,
        # and they are distinct by construction (task, seed, index).
        if self.near and first[Col.DOMAIN] != "gym" and self.near.check(first[Col.PROBLEM_ID], first[Col.PROMPT]):
            return "near_duplicate"
        return None


def _resolve(base_dir: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base_dir / p
