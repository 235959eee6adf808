import math

import pytest

from pipeline.generate.completion import mean_topk_entropy, topk_entropy
from pipeline.records import split_reasoning


def test_inline_think_block_is_split_from_the_answer():
    assert split_reasoning("<think>\n2+2 is 4\n</think>\n\nThe answer is 4.") == ("2+2 is 4", "The answer is 4.")


def test_template_opened_think_block_has_only_the_closing_tag():
    assert split_reasoning("add them\n</think>\n4") == ("add them", "4")


def test_engine_reasoning_field_wins_over_inline_tags():
    assert split_reasoning("4", reasoning_field=" add them ") == ("add them", "4")


def test_text_without_tags_is_all_answer():
    assert split_reasoning("  just 4 \n") == ("", "just 4")


def test_an_unclosed_think_block_has_no_answer():
    # A truncated trace: its tentative box is a draft inside the thinking, not the model's conclusion.
    assert split_reasoning("<think>\nmaybe \\boxed{3}, let me check") == ("maybe \\boxed{3}, let me check", "")
    assert split_reasoning("<think>a</think>\n4 <think>b") == ("a</think>\n4 <think>b", "")  # reopened, unclosed


def test_a_block_the_template_opened_and_the_text_never_closed_has_no_answer():
    assert split_reasoning("maybe \\boxed{3}", think_opened=True) == ("maybe \\boxed{3}", "")
    assert split_reasoning("add them\n</think>\n4", think_opened=True) == ("add them", "4")


def test_the_answer_follows_the_last_closing_tag():
    assert split_reasoning("<think>a</think>\\boxed{1}</think>\n\\boxed{2}") == ("a</think>\\boxed{1}", "\\boxed{2}")


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


def test_a_trace_cut_inside_a_block_the_chat_template_opened_has_no_answer(embedded_model):
    # DeepSeek-R1's templates end the prompt with <think>: the engine's prompt tells, and the generate stage then
    # stores a completion that never wrote </think> as all reasoning, so its tentative box is no answer.
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from pipeline.generate.stage import _rows
    from pipeline.generate.teacher.base import TeacherResult
    from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher, _completions
    from pipeline.records import Problem

    tokenizer = AutoTokenizer.from_pretrained(embedded_model.path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}<|Assistant|><think>\n"
    teacher = VLLMEngineTeacher(embedded_model, None, llm=SimpleNamespace(get_tokenizer=lambda: tokenizer))
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    ids, think_opened = teacher._prompt(messages)
    assert think_opened and tokenizer.decode(ids).startswith("What is 6 times 7?\n<|Assistant|><think>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}<|Assistant|>"
    assert not teacher._prompt(messages)[1]

    choice = SimpleNamespace(
        index=0, text="Maybe \\boxed{41}, let me", finish_reason="length", token_ids=[1], logprobs=None
    )
    completions = _completions(SimpleNamespace(outputs=[choice]), 0, think_opened)
    problem = Problem("p", "s", "math", "What is 6 times 7?", "42")
    (row,) = _rows(problem, messages, TeacherResult("p", completions), {})
    assert (row["completion"], row["reasoning"], row["answer"]) == (choice.text, choice.text, "")
