import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from pipeline.build.dedup import Decontaminator, ExactDedup, NearDuplicatePrompts, load_eval_texts, normalize_for_dedup

EVAL_PROBLEMS = [
    "A train leaves the station at 9:15 AM traveling at 60 miles per hour. A second train leaves the same station "
    "at 10:00 AM traveling at 75 miles per hour on a parallel track. At what time does the second train catch up?",
    "Maria has 3 times as many marbles as Jonah. After Maria gives Jonah 12 marbles, they have the same number of "
    "marbles. How many marbles did Maria have at the start?",
    "A rectangular garden is 18 meters long and 7 meters wide. A path 1 meter wide is built around the outside of "
    "the garden. What is the area of the path in square meters?",
    "Find the number of positive integers less than 1000 that are divisible by 7 but not by 11.",
    "The sum of three consecutive odd integers is 147. What is the product of the smallest and the largest of them?",
    "A store sells pencils in packs of 8 and erasers in packs of 6. Lena wants to buy the same number of pencils and "
    "erasers. What is the smallest number of pencils she can buy?",
    "Let f(x) = 2x^2 - 3x + 5. Compute f(f(1)) and write your answer as an integer.",
    "A bag contains 5 red balls, 4 blue balls and 3 green balls. Two balls are drawn without replacement. What is "
    "the probability that both balls are the same color?",
    "Tom reads 24 pages of his book on Monday and then reads 6 more pages each day than the day before. On which day "
    "of the week does he first read more than 50 pages?",
    "The average of five numbers is 38. When one number is removed, the average of the remaining four numbers is 35. "
    "What number was removed?",
    "How many ways can the letters of the word BANANA be arranged so that no two letters A are next to each other?",
    "A cylinder has a radius of 4 centimeters and a height of 10 centimeters. Water fills it to three quarters of its "
    "height. What volume of water is in the cylinder, in terms of pi?",
    "Solve for x in the equation 3(x - 4) + 7 = 2x + 9, and then compute the value of x squared minus 10.",
    "A shirt originally costs 40 dollars. It is discounted by 25 percent, and then a sales tax of 8 percent is "
    "applied to the discounted price. What is the final price in dollars?",
    "Two fair six-sided dice are rolled. What is the probability that the sum of the numbers shown is a prime number?",
    "A farmer has chickens and cows in a barn. Altogether the animals have 50 heads and 140 legs. How many cows does "
    "the farmer have in the barn?",
    "What is the remainder when 2 raised to the power of 100 is divided by 7? Give your answer as a single digit.",
    "A ladder 13 feet long leans against a vertical wall. The bottom of the ladder is 5 feet from the base of the "
    "wall. How high up the wall does the top of the ladder reach?",
    "In a class of 30 students, 18 play soccer, 12 play basketball and 7 play both sports. How many students in the "
    "class play neither soccer nor basketball?",
    "The first term of an arithmetic sequence is 7 and the common difference is 4. What is the sum of the first 20 "
    "terms of the sequence?",
]
# Unrelated problems on the same topics, worded independently: a decontaminator must not drop these.
HARD_NEGATIVES = [
    "Two cars start from the same town, one at 50 km/h and one an hour later at 70 km/h. When does the second one "
    "overtake the first?",
    "A square lawn of side 10 m has a flower border 2 m wide inside its edge. Find the area of the border.",
    "How many integers between 1 and 500 are multiples of 3 or 5?",
    "If g(x) = x^3 - x, evaluate g(g(2)).",
    "The mean of four test scores is 82. A fifth score of 92 is added. What is the new mean?",
    "In how many ways can the letters of LEVEL be arranged?",
]
ADDED_BEFORE = "Solve the following problem carefully and explain each step of your reasoning. "
ADDED_AFTER = " Put your final answer inside a box at the end."


def _change_a_word(text: str) -> str:
    """Swap one non-numeric word near the middle, keeping every number."""
    words = text.split(" ")
    middle = len(words) // 2
    index = next(i for i in range(middle, len(words)) if words[i].isalpha())
    words[index] = "certain" if words[index].lower() != "certain" else "some"
    return " ".join(words)


PARAPHRASES = {
    "exact": lambda t: t,
    "case_punct": lambda t: t.upper().replace("?", " ??").replace(".", "!").replace(",", ";"),
    "whitespace": lambda t: "\n  " + t.replace(" ", "  \t").replace(". ", ".\n\n") + "\n",
    "word_changed": _change_a_word,
    "sentence_before": lambda t: ADDED_BEFORE + t,
    "sentence_after": lambda t: t + ADDED_AFTER,
    "combined": lambda t: ADDED_BEFORE + _change_a_word(t).lower() + ADDED_AFTER,
}


def _unrelated_prompts() -> list[str]:
    prompts = []
    for task in ("basic_arithmetic", "leg_counting", "word_sorting"):
        prompts += [entry["question"] for entry in reasoning_gym.create_dataset(task, size=70, seed=7)]
    return prompts + HARD_NEGATIVES


def _raw_rows() -> list[tuple[str | None, str]]:
    """(expected eval set name or None, prompt), planted copies interleaved with unrelated rows."""
    planted = [("gsm_eval", f(p)) for p in EVAL_PROBLEMS for f in PARAPHRASES.values()]
    unrelated = [(None, p) for p in _unrelated_prompts()]
    rows = []
    for i in range(max(len(planted), len(unrelated))):
        rows += unrelated[i : i + 1] + planted[i : i + 1]
    return rows


def test_normalize_for_dedup_folds_case_unicode_punctuation_and_spacing():
    assert normalize_for_dedup("  \uff37hat  is\t3.5 + x_1?\n") == "what is 3 5 x 1"
    assert normalize_for_dedup("...") == ""


def test_planted_eval_problems_are_removed_and_unrelated_rows_stay():
    decontaminator = Decontaminator([("gsm_eval", p) for p in EVAL_PROBLEMS])
    rows = _raw_rows()
    assert len(rows) > 300
    missed = [prompt for expected, prompt in rows if expected and decontaminator.check(prompt) != expected]
    false_drops = [prompt for expected, prompt in rows if expected is None and decontaminator.check(prompt)]
    assert missed == []
    assert false_drops == []


def test_short_eval_texts_match_whole_and_only_whole():
    decontaminator = Decontaminator([("tiny", "What is 7 times 8?"), ("long", EVAL_PROBLEMS[0])], n=8)
    assert decontaminator.check("what is 7 TIMES 8") == "tiny"
    assert decontaminator.check("What is 7 times 9?") is None
    assert decontaminator.check("Calculate 7 * 8.") is None
    assert Decontaminator([("blank", " ?! ")]).check("") is None


def test_first_listed_eval_set_is_reported_and_n_is_configurable():
    text = EVAL_PROBLEMS[3]
    decontaminator = Decontaminator([("second", EVAL_PROBLEMS[4]), ("first", text), ("again", text)])
    assert decontaminator.check(ADDED_BEFORE + text) == "first"
    # A 13-word overlap with a 4-word tail changed: caught at n=8, not at n=13 or above.
    loose = Decontaminator([("set", text)], n=8)
    strict = Decontaminator([("set", text)], n=14)
    reworded = text.replace("divisible by 7 but not by 11", "multiples of 7 and not of 11")
    assert loose.check(reworded) == "set"
    assert strict.check(reworded) is None


def test_load_eval_texts_reads_jsonl_and_parquet(tmp_path: Path):
    jsonl = tmp_path / "aime_2024.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "answer": "1"}) for p in EVAL_PROBLEMS[:3]) + "\n\n")
    parquet = tmp_path / "math500.parquet"
    pq.write_table(pa.table({"problem": EVAL_PROBLEMS[3:5], "answer": ["1", "2"]}), parquet)

    assert list(load_eval_texts(jsonl)) == [("aime_2024", p) for p in EVAL_PROBLEMS[:3]]
    assert list(load_eval_texts(parquet, field="problem")) == [("math500", p) for p in EVAL_PROBLEMS[3:5]]
    decontaminator = Decontaminator([*load_eval_texts(jsonl), *load_eval_texts(parquet, field="problem")])
    assert decontaminator.check(EVAL_PROBLEMS[4].upper()) == "math500"

    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        list(load_eval_texts(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="problem"):
        list(load_eval_texts(jsonl, field="problem"))
    with pytest.raises(ValueError, match="prompt"):
        list(load_eval_texts(parquet))


def test_exact_dedup_catches_case_and_whitespace_variants_not_different_answers():
    dedup = ExactDedup()
    assert not dedup.seen("What is 2 + 2?", "The answer is 4.")
    assert dedup.seen("  what IS 2 +\n2 ?", "the answer is 4")
    assert not dedup.seen("What is 2 + 2?", "The answer is 5.")
    assert not dedup.seen("What is 2 + 3?", "The answer is 4.")
    # The pair boundary matters: moving a word from prompt to answer is a different pair.
    assert not dedup.seen("a b", "c")
    assert not dedup.seen("a", "b c")


FORTY_WORDS = (
    "A group of hikers starts at the trailhead early in the morning and walks north along the river for "
    "twelve kilometers before stopping for lunch near an old wooden bridge where they rest and then return "
    "by the same path"
)


def test_near_duplicate_prompts_catches_one_changed_word():
    assert len(FORTY_WORDS.split()) == 40
    near = NearDuplicatePrompts(threshold=0.7)
    assert near.check("hike-1", FORTY_WORDS) is None
    assert near.check("hike-2", FORTY_WORDS.replace("wooden", "stone")) == "hike-1"
    assert near.check("hike-3", FORTY_WORDS.upper() + "!") == "hike-1"


def test_near_duplicate_prompts_keeps_different_prompts_and_repeated_problem_ids():
    near = NearDuplicatePrompts(threshold=0.7)
    assert near.check("hike", FORTY_WORDS) is None
    assert near.check("hike", FORTY_WORDS) is None  # another sample of the same problem
    for i, prompt in enumerate(EVAL_PROBLEMS):
        assert near.check(f"eval-{i}", prompt) is None, prompt
    assert near.check("short-1", "Add 2 and 3.") is None
    assert near.check("short-2", "add 2 and 3") == "short-1"
    assert near.check("short-3", "Add 2 and 4.") is None


def test_templated_generated_prompts_are_not_near_duplicates_at_default_threshold():
    # word_sorting is left out on purpose: its long fixed instructions around a six-word list give true word-3-gram
    # Jaccard up to 0.88 between different problems, so text similarity alone cannot tell those apart.
    prompts = [entry["question"] for entry in reasoning_gym.create_dataset("leg_counting", size=70, seed=7)]
    prompts += [entry["question"] for entry in reasoning_gym.create_dataset("basic_arithmetic", size=70, seed=7)]
    near = NearDuplicatePrompts()
    flagged = [p for i, p in enumerate(prompts + HARD_NEGATIVES) if near.check(f"row-{i}", p) is not None]
    assert flagged == []


def _decisions() -> list[tuple[bool, str | None, str | None]]:
    exact, near = ExactDedup(), NearDuplicatePrompts(threshold=0.7)
    decontaminator = Decontaminator([("gsm_eval", p) for p in EVAL_PROBLEMS[:10]])
    decisions = []
    for i, (_, prompt) in enumerate(_raw_rows()):
        decisions.append((exact.seen(prompt, "42"), near.check(f"p{i}", prompt), decontaminator.check(prompt)))
    return decisions


def test_decisions_are_deterministic():
    first, second = _decisions(), _decisions()
    assert first == second
    assert any(exact for exact, _, _ in first)
    assert any(near for _, near, _ in first)
    assert any(contaminated for _, _, contaminated in first)


def test_a_local_hugging_face_dataset_is_an_eval_set(tmp_path):
    import datasets

    problem = "A farmer has 17 sheep and buys 5 more at the market on Tuesday. How many sheep does the farmer have?"
    splits = {"test": datasets.Dataset.from_dict({"question": [problem]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "gsm_local"))
    decontaminator = Decontaminator(load_eval_texts(tmp_path / "gsm_local", field="question"))
    assert decontaminator.check("Quick one. " + problem.upper()) == "gsm_local"
    assert decontaminator.check("What is the capital of the country north of Spain and south of Belgium?") is None
