import math

import pytest

from pipeline.completion import mean_topk_entropy, split_reasoning, topk_entropy


def test_inline_think_block_is_split_from_the_answer():
    assert split_reasoning("<think>\n2+2 is 4\n</think>\n\nThe answer is 4.") == ("2+2 is 4", "The answer is 4.")


def test_template_opened_think_block_has_only_the_closing_tag():
    assert split_reasoning("add them\n</think>\n4") == ("add them", "4")


def test_engine_reasoning_field_wins_over_inline_tags():
    assert split_reasoning("4", reasoning_field=" add them ") == ("add them", "4")


def test_text_without_tags_is_all_answer():
    assert split_reasoning("  just 4 \n") == ("", "just 4")


def test_topk_entropy_matches_hand_computation():
    # two equally likely alternatives: entropy log 2, whatever their absolute logprobs
    assert topk_entropy([math.log(0.3), math.log(0.3)]) == pytest.approx(math.log(2))
    # p = (0.5, 0.25, 0.25) after renormalization of (0.4, 0.2, 0.2)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert topk_entropy([math.log(0.4), math.log(0.2), math.log(0.2)]) == pytest.approx(expected)
    assert topk_entropy([0.0]) == 0.0


def test_mean_entropy_keeps_only_the_top_k_and_averages_over_tokens():
    certain = [0.0, -50.0, -60.0]
    even = [math.log(0.25)] * 2 + [math.log(0.01)]  # the third alternative falls outside k=2
    assert mean_topk_entropy([certain, even], k=2) == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert mean_topk_entropy([], k=5) is None
