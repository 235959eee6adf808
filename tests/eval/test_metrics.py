"""pass@1, cons@k and their standard errors on fixed verdicts, against numbers worked out by hand."""

import json
import math
from pathlib import Path

import pytest

from eval.metrics import Sample, cons_at_k, majority_vote, pass_at_1, percentile

T, F = True, False


def samples(verdicts, answers=None):
    answers = answers or [None] * len(verdicts)
    return [Sample(v, a) for v, a in zip(verdicts, answers, strict=True)]


def test_pass_at_1_averages_each_problems_share_of_correct_samples():
    # Per-problem rates 3/4, 1/4, 0, 1 -> mean 0.5 (not 8/16 by luck: the second case below has unequal k).
    problems = [samples([T, T, T, F]), samples([F, T, F, F]), samples([F, F, F, F]), samples([T, T, T, T])]
    score = pass_at_1(problems)
    assert score.value == pytest.approx(0.5)
    # Sample variance of (.75, .25, 0, 1) around .5: (.0625 + .0625 + .25 + .25) / 3 = 0.208333...
    # Standard error: sqrt(0.208333 / 4) = 0.228218...
    assert score.stderr == pytest.approx(math.sqrt((0.0625 + 0.0625 + 0.25 + 0.25) / 3 / 4))
    assert score.stderr == pytest.approx(0.2282177, abs=1e-7)
    assert score.problems == 4


def test_pass_at_1_weights_problems_equally_whatever_their_sample_count():
    # 1 of 1 and 1 of 4: per-problem mean (1 + .25) / 2 = .625, whereas pooling samples would give 2/5 = .4.
    score = pass_at_1([samples([T]), samples([T, F, F, F])])
    assert score.value == pytest.approx(0.625)
    assert score.stderr == pytest.approx(math.sqrt(((1 - 0.625) ** 2 + (0.25 - 0.625) ** 2) / 1 / 2))


def test_standard_error_is_undefined_for_one_problem_and_zero_for_identical_rates():
    one = pass_at_1([samples([T, F])])
    assert one.value == 0.5 and math.isnan(one.stderr)
    same = pass_at_1([samples([T, F]), samples([F, T])])
    assert same.value == 0.5 and same.stderr == 0.0
    assert math.isnan(pass_at_1([]).value)


def test_cons_at_k_takes_the_majority_answer_verdict():
    problems = [
        # "12" twice (correct) beats "13" once: solved
        samples([T, F, T], ["12", "13", "$12$."]),
        # wrong "7" three times beats the one correct "8": not solved, although pass@1 is 1/4
        samples([F, F, T, F], ["7", "7", "8", "7"]),
        # a tie goes to the answer seen first: "5" (correct) before "6"
        samples([T, F, T, F], ["5", "6", "5", "6"]),
        # no sample has an answer: not solved
        samples([F, F], [None, None]),
    ]
    score = cons_at_k(problems)
    assert score.value == pytest.approx(2 / 4)
    # Bernoulli outcomes 1, 0, 1, 0: sample variance 1/3, standard error sqrt(1/3 / 4)
    assert score.stderr == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    assert pass_at_1(problems).value == pytest.approx((2 / 3 + 1 / 4 + 2 / 4 + 0) / 4)


def test_majority_vote_ignores_samples_without_an_answer():
    winner = majority_vote(samples([F, F, T], [None, None, "4"]))
    assert winner == Sample(T, "4")
    assert majority_vote(samples([F], [None])) is None


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_a_problem_without_a_scored_sample_counts_as_failed_in_every_score():
    # Rates 1, .5, 0 and an unanswered problem: (1 + .5 + 0 + 0) / 4, not / 3.
    problems = [samples([T, T]), samples([T, F]), samples([F, F]), []]
    score = pass_at_1(problems)
    assert score.value == pytest.approx(0.375) and score.problems == 4
    assert score.stderr == pytest.approx(math.sqrt((0.625**2 + 0.125**2 + 2 * 0.375**2) / 3 / 4))
    cons = cons_at_k([samples([T, T], ["1", "1"]), samples([F, F], ["2", "2"]), []])
    assert cons.value == pytest.approx(1 / 3) and cons.problems == 3


def test_the_kv_cache_size_uses_the_dtype_the_engine_runs_in_not_the_auto_setting(embedded_model):
    """teacher.dtype "auto" runs as float32 on CPU: 4 bytes per value, where "auto" alone would read as 2."""
    from eval.config import EvalConfig
    from eval.evaluate import _engine_dtype
    from eval.resources import kv_bytes_per_token
    from pipeline.generate.teacher.vllm_engine import running_on_cpu

    cfg = EvalConfig(models=["smollm2-135m-instruct"], benchmarks=["humaneval"])
    assert cfg.engine.dtype == "auto"
    config = json.loads((Path(embedded_model.path) / "config.json").read_text())
    per_value = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    expected_dtype, value_bytes = ("float32", 4) if running_on_cpu() else ("auto", 2)  # the model's bf16 on a GPU
    assert _engine_dtype(cfg) == expected_dtype
    assert kv_bytes_per_token(Path(embedded_model.path), _engine_dtype(cfg)) == value_bytes * per_value
