# ruff: noqa: E501, RUF001 - teacher text as models write it: a paragraph per line, full-width CJK punctuation

import pytest

from pipeline.verify.config import FILTER_NAMES, FilterConfig
from pipeline.verify.filters import FILTERS, FilterInput, apply_filters

CFG = FilterConfig()

MATH_PROMPT = (
    "Let $f(x) = x^3 - 6x^2 + 9x + 1$. Find the sum of the local maximum value and the local minimum value of $f$."
)
MATH_REASONING = r"""Okay, so I need to find the local maximum and local minimum values of $f(x) = x^3 - 6x^2 + 9x + 1$ and then add them together. Let me start by finding the critical points.

The derivative is $f'(x) = 3x^2 - 12x + 9$. Setting it equal to zero gives $3x^2 - 12x + 9 = 0$, so dividing by 3, $x^2 - 4x + 3 = 0$, which factors as $(x - 1)(x - 3) = 0$. So the critical points are $x = 1$ and $x = 3$.

Now I should check which one is the maximum. The second derivative is $f''(x) = 6x - 12$. At $x = 1$, $f''(1) = -6 < 0$, so that's a local maximum. At $x = 3$, $f''(3) = 6 > 0$, so that's a local minimum.

Let me compute the values. $f(1) = 1 - 6 + 9 + 1 = 5$. And $f(3) = 27 - 54 + 27 + 1 = 1$.

Wait, let me double-check $f(3)$: $3^3 = 27$, $6 \cdot 3^2 = 54$, $9 \cdot 3 = 27$, so $27 - 54 + 27 + 1 = 1$. Yes, that's right.

So the sum is $5 + 1 = 6$. Hmm, just to be safe, I can verify with Vieta: the sum of the critical points is $\frac{12}{3} = 4$, and \[ f(1) + f(3) = (1 + 27) - 6(1 + 9) + 9(1 + 3) + 2 = 28 - 60 + 36 + 2 = 6. \] That matches, so the answer is 6."""
MATH_ANSWER = r"""The critical points are $x = 1$ (local maximum, $f(1) = 5$) and $x = 3$ (local minimum, $f(3) = 1$).

The sum is $\boxed{6}$."""

CODE_PROMPT = """Given an array of integers nums and an integer k, return the number of contiguous subarrays whose sum equals k.

Input: the first line holds n and k, the second line holds n integers.
Output: a single integer."""
CODE_REASONING = """Okay, let's see. I need to count subarrays with sum exactly k. The brute force approach checks every pair of endpoints, which is O(n^2) and too slow if n is up to 2 * 10^5.

The standard trick is prefix sums with a hash map. If prefix[j] - prefix[i] == k, then the subarray from i to j - 1 sums to k. So for each prefix sum s, I add the count of earlier prefix sums equal to s - k.

Let me sketch it:

```python
from collections import defaultdict

def count(nums, k):
    seen = defaultdict(int)
    seen[0] = 1
    total = s = 0
    for x in nums:
        s += x
        total += seen[s - k]
        seen[s] += 1
    return total
```

Wait, the order matters: I must look up s - k before inserting s, otherwise k = 0 would count the empty subarray. The code above does that.

Let me test with nums = [1, 1, 1], k = 2. Prefix sums are 1, 2, 3. At s = 2, seen[0] = 1, so total = 1. At s = 3, seen[1] = 1, so total = 2. Correct.

Negative numbers are fine because we never rely on monotonic prefix sums. Now the input parsing: read n and k, then the list."""
CODE_ANSWER = """```python
import sys
from collections import defaultdict


def main():
    data = sys.stdin.read().split()
    n, k = int(data[0]), int(data[1])
    nums = list(map(int, data[2 : 2 + n]))
    seen = defaultdict(int)
    seen[0] = 1
    total = s = 0
    for x in nums:
        s += x
        total += seen[s - k]
        seen[s] += 1
    print(total)


main()
```"""

GYM_PROMPT = """Solve the Tower of Hanoi problem with 3 disks and 3 pegs.
Move all disks from Peg 1 to Peg 3 following the rules:
- Only one disk can be moved at a time.
- A larger disk cannot be placed on top of a smaller disk.

Provide the sequence of moves, one per line."""
HANOI_MOVES = """Move disk 1 from Peg 1 to Peg 3
Move disk 2 from Peg 1 to Peg 2
Move disk 1 from Peg 3 to Peg 2
Move disk 3 from Peg 1 to Peg 3
Move disk 1 from Peg 2 to Peg 1
Move disk 2 from Peg 2 to Peg 3
Move disk 1 from Peg 1 to Peg 3"""
GYM_REASONING = f"""Okay, the classic recursive solution: move the top two disks to Peg 2, move disk 3 to Peg 3, then move the two disks onto it. That takes 2^3 - 1 = 7 moves.

{HANOI_MOVES}

Let me verify each move keeps smaller disks on top. After move 3, Peg 2 holds disks 2 and 1, Peg 3 is empty, so disk 3 can go there. Then disk 1 goes to Peg 1 to free disk 2, disk 2 goes onto disk 3, and disk 1 follows. All seven moves are legal.

{HANOI_MOVES}"""


def completion(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def row(reasoning=MATH_REASONING, answer=MATH_ANSWER, prompt=MATH_PROMPT, domain="math", **kw) -> FilterInput:
    fields = {"completion": completion(reasoning, answer), "finish_reason": "stop", "completion_tokens": 600} | kw
    return FilterInput(prompt=prompt, reasoning=reasoning, answer=answer, domain=domain, **fields)


MATH, CODE = row(), row(CODE_REASONING, CODE_ANSWER, CODE_PROMPT, "code")
GYM = row(GYM_REASONING, HANOI_MOVES, GYM_PROMPT, "gym")


@pytest.mark.parametrize("good", [MATH, CODE, GYM], ids=["math", "code", "gym"])
def test_realistic_completions_pass_every_filter(good):
    assert apply_filters(good, CFG) == []


def test_registry_holds_every_filter_in_config_order():
    assert tuple(FILTERS) == FILTER_NAMES


def test_truncated_only_when_cut_by_the_token_budget():
    assert apply_filters(row(finish_reason="length"), CFG) == ["truncated"]
    assert not FILTERS["truncated"](row(finish_reason="stop"), CFG)


@pytest.mark.parametrize(
    "text",
    [
        completion("reasoning", "4"),
        "reasoning\n</think>\n\n4",  # the chat template opened the block
    ],
)
def test_one_think_block_is_well_formed(text):
    assert not FILTERS["malformed_think"](row("reasoning", "4", completion=text), CFG)


def test_reasoning_split_off_by_the_engine_is_well_formed():
    assert not FILTERS["malformed_think"](row("reasoning", "4", completion="4"), CFG)


@pytest.mark.parametrize(
    ("text", "reasoning"),
    [
        ("The answer is 4.", ""),  # missing
        ("<think>\nLet me add 2 and 2, that is 4, so", "Let me add 2 and 2, that is 4, so"),  # unclosed
        ("<think>\nadd\n</think>\n<think>\nagain\n</think>\n4", "add"),  # two blocks
        ("</think> 4 <think>add", "4 <think>add"),  # closed before it opens
        ("<think>\n\n</think>\n\n4", ""),  # empty
        ("4", "add <think> more"),  # engine field holding stray tags
    ],
)
def test_malformed_think_blocks_fail(text, reasoning):
    assert FILTERS["malformed_think"](row(reasoning, "4", completion=text), CFG)


def mixing(reasoning, prompt=MATH_PROMPT, answer="The answer is $\\boxed{6}$."):
    return FILTERS["language_mixing"](row(reasoning, answer, prompt), CFG)


@pytest.mark.parametrize("good", [MATH, CODE, GYM], ids=["math", "code", "gym"])
def test_english_technical_reasoning_is_not_language_mixing(good):
    assert not FILTERS["language_mixing"](good, CFG)


@pytest.mark.parametrize(
    "chunk",
    [
        "嗯，这里好像有问题，让我再仔细检查一下导数的计算过程，看看是不是哪里算错了。",
        "Подождите, давайте ещё раз проверим это вычисление, потому что результат кажется странным.",
        "Donc la dérivée seconde est négative en ce point, ce qui confirme que c'est bien un maximum local.",
    ],
    ids=["zh", "ru", "fr"],
)
def test_a_paragraph_in_another_language_is_caught(chunk):
    paragraphs = MATH_REASONING.split("\n\n")
    assert mixing("\n\n".join([*paragraphs[:3], chunk, *paragraphs[3:]]))


def test_a_chinese_clause_inside_an_english_sentence_is_caught():
    reasoning = MATH_REASONING.replace(
        "Yes, that's right.", "Yes, 所以这个值是正确的，我们可以继续计算极小值和极大值的和，然后验证结果。"
    )
    assert mixing(reasoning)


ZH_PROMPT = "已知函数 $f(x) = x^3 - 6x^2 + 9x + 1$，求函数 $f$ 的极大值与极小值之和，并说明理由。"


def test_english_reasoning_for_a_chinese_prompt_is_caught():
    assert mixing(MATH_REASONING, prompt=ZH_PROMPT)


def test_chinese_prompt_with_chinese_reasoning_is_not_mixing():
    prompt = ZH_PROMPT
    reasoning = (
        "好的，我需要先求出函数的导数：$f'(x) = 3x^2 - 12x + 9$。令导数等于零，得到 $x = 1$ 或 $x = 3$。\n\n"
        "二阶导数 $f''(x) = 6x - 12$，在 $x = 1$ 处为负，所以是极大值点；在 $x = 3$ 处为正，所以是极小值点。\n\n"
        "计算 $f(1) = 5$，$f(3) = 1$，所以两者之和为 $6$。让我再检查一下，没有问题。"
    )
    assert not mixing(reasoning, prompt=prompt, answer="极大值与极小值之和为 $\\boxed{6}$。")


def test_a_short_prompt_still_catches_a_switch_inside_the_reasoning():
    chunk = "嗯，这里好像有问题，让我再仔细检查一下导数的计算过程，看看是不是哪里算错了。"
    assert not mixing(MATH_REASONING, prompt="Compute $f(1) + f(3)$.")
    assert mixing(MATH_REASONING + "\n\n" + chunk, prompt="Compute $f(1) + f(3)$.")


def test_a_passage_quoted_in_the_prompt_is_not_a_switch():
    prompt = (
        "Translate the following sentence into English and explain the grammar of its verb.\n\n"
        "« Nous avons longtemps cherché la solution de ce problème difficile. »"
    )
    reasoning = (
        "Okay, the sentence means: we searched for the solution to this difficult problem for a long time. "
        "The verb is in the passé composé, formed with the auxiliary avoir and the past participle cherché. "
        "The adverb longtemps sits between the auxiliary and the participle, as French adverbs usually do."
    )
    assert not mixing(reasoning, prompt=prompt, answer="We searched for a long time.")


def test_reasoning_too_short_to_identify_is_not_judged():
    assert not mixing("Donc $x = 3$.", prompt=MATH_PROMPT)


def test_the_answer_is_judged_when_there_is_no_reasoning():
    answer = "Подождите, давайте ещё раз проверим это вычисление, потому что результат кажется странным."
    assert FILTERS["language_mixing"](row("", answer, MATH_PROMPT, completion=answer), CFG)


def repeats(text, domain="math"):
    return FILTERS["repetition"](row(text, "The answer is 12.", domain=domain), CFG)


def test_a_sentence_loop_is_caught():
    assert repeats("Okay, so $3 \\times 4 = 12$. " + "Let me check again. " * 50)


def test_a_paragraph_loop_is_caught():
    loop = "Wait, that doesn't seem right.\n\nMaybe I made an arithmetic mistake somewhere.\n\n"
    assert repeats(MATH_REASONING + "\n\n" + loop * 8)


def test_reasoning_starting_over_and_over_is_caught():
    assert repeats("\n\n".join([MATH_REASONING] * 5))


def test_a_loop_without_spaces_is_caught():
    assert repeats("So the string is " + "abcabc" * 40)
    assert repeats("我需要再检查一下这个计算是否正确。" * 12)


def test_a_recurring_phrase_across_lines_is_caught():
    steps = "\n".join(
        f"Step {i}: let me substitute back into the original equation to verify it holds." for i in range(8)
    )
    assert repeats(steps)


def test_short_words_and_numbers_repeating_are_not_loops():
    reasoning = MATH_REASONING + "\nSo so so, 1/3 = 0.3333333333333333, so the total is 6, so we are done."
    assert not repeats(reasoning)


def test_grids_move_lists_and_program_drafts_are_not_loops():
    grid = "\n".join(["0 0 0 0 0 0 0 0 0 0 0 0"] * 12)
    assert not repeats(f"The input grid is:\n{grid}\n\nThe output grid is the same:\n{grid}\n\nSo:\n{grid}", "gym")
    assert not repeats("\n\n".join([HANOI_MOVES] * 4), "gym")
    jugs = '["fill C", "pour C->B", "empty B", "pour C->B", "empty B", "pour C->B", "empty B", "pour C->B"]'
    assert not repeats(f"So the moves are:\n{jugs}\n\nLet me simulate.\n{jugs}\n\nFinal:\n{jugs}", "gym")
    draft = CODE_REASONING.split("```")[1]
    assert not repeats("\n\nLet me rewrite it once more.\n\n".join([f"```{draft}```"] * 5), "code")


def test_a_wall_of_prose_is_a_long_paragraph():
    wall = " ".join(["Then I subtract the second equation from the first and simplify the terms on both sides."] * 60)
    assert len(wall) > 5000
    assert FILTERS["long_paragraph"](row(MATH_REASONING + "\n\n" + wall), CFG)


def test_code_lists_and_short_paragraphs_are_not_long():
    code = "```python\n" + "\n".join(f"table[{i}] = compute({i}) + offset * {i}" for i in range(200)) + "\n```"
    moves = "\n".join([HANOI_MOVES] * 30)
    assert len(code) > 5000 and len(moves) > 5000
    assert not FILTERS["long_paragraph"](row(CODE_REASONING, code, CODE_PROMPT, "code"), CFG)
    assert not FILTERS["long_paragraph"](row(GYM_REASONING, moves, GYM_PROMPT, "gym"), CFG)
    assert not FILTERS["long_paragraph"](MATH, CFG)


def test_a_program_in_math_reasoning_is_caught():
    program = "Let me just compute it.\n\n```python\nf = lambda x: x**3 - 6*x**2 + 9*x + 1\nprint(f(1) + f(3))\n```\n"
    assert FILTERS["code_in_math_reasoning"](row(MATH_REASONING + "\n\n" + program), CFG)
    no_think = program + "\nThe answer is $\\boxed{6}$."
    assert FILTERS["code_in_math_reasoning"](row("", no_think, completion=no_think), CFG)


def test_programs_outside_math_reasoning_and_latex_fences_pass():
    assert not FILTERS["code_in_math_reasoning"](CODE, CFG)
    assert not FILTERS["code_in_math_reasoning"](row(MATH_REASONING, "```python\nprint(6)\n```"), CFG)
    latex = MATH_REASONING + "\n\n```latex\n\\frac{12}{3} = 4\n```"
    assert not FILTERS["code_in_math_reasoning"](row(latex), CFG)


def test_length_bounds_use_tokens_when_known_else_words():
    cfg = FilterConfig(min_completion_tokens=50, max_completion_tokens=1000)
    assert FILTERS["length_bounds"](row(completion_tokens=10), cfg)
    assert FILTERS["length_bounds"](row(completion_tokens=1001), cfg)
    assert not FILTERS["length_bounds"](row(completion_tokens=1000), cfg)
    assert not FILTERS["length_bounds"](row(completion_tokens=None), cfg)  # a few hundred words
    assert FILTERS["length_bounds"](row("add", "4", completion_tokens=None), cfg)
    assert not FILTERS["length_bounds"](row(completion_tokens=10**6), FilterConfig())  # no upper bound by default


def test_only_enabled_filters_are_reported_in_config_order():
    bad = row(MATH_REASONING + "\n\n```python\nprint(6)\n```", finish_reason="length", completion_tokens=0)
    assert apply_filters(bad, CFG) == ["truncated", "code_in_math_reasoning", "length_bounds"]
    cfg = FilterConfig(enabled=["length_bounds", "truncated"])
    assert apply_filters(bad, cfg) == ["truncated", "length_bounds"]
    assert apply_filters(bad, FilterConfig(enabled=[])) == []


def test_unknown_filter_names_are_refused():
    with pytest.raises(ValueError, match="trunctated"):
        apply_filters(MATH, FilterConfig(enabled=["trunctated"]))


def test_input_is_built_from_a_raw_row():
    raw = {"problem_id": "p", "prompt": "q", "completion": "c", "reasoning": "r", "answer": "a", "domain": "math"}
    built = FilterInput.from_row(raw | {"finish_reason": "stop", "completion_tokens": None, "teacher": "t"})
    assert built == FilterInput("q", "c", "r", "a", "math", "stop", None)
