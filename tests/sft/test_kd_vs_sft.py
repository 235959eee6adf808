"""Acceptance: a pruned student (SmolLM2, 30 -> 8 layers) trained with logit distillation from the full SmolLM2 ends
with a lower held-out loss on teacher completions than the same student trained without it for the same steps."""

from __future__ import annotations

import pytest

from benchmarks.kd_vs_sft import run

pytestmark = pytest.mark.slow


def test_distillation_beats_plain_sft_on_held_out_teacher_completions(tmp_path):
    result = run(tmp_path, problems=128, steps=30, layers=8, max_new_tokens=64)
    print(result)
    assert result["kd"] < result["sft"] < result["before"], result
