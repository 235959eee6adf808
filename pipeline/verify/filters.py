"""DeepSeek-R1's quality filters: a row that fails one is dropped from training data whatever its correctness.

Every filter is a predicate "fails?" over one completion, registered by its FILTER_NAMES name in FILTERS. They err on
the side of keeping text: a filter that rejects good reasoning silently biases the dataset, one that misses a bad row
costs a single row.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from functools import cache, lru_cache
from typing import Any

from pipeline.records import THINK_CLOSE, THINK_OPEN
from pipeline.verify.config import FILTER_NAMES, FilterConfig

# language_mixing: a chunk must be this sure of its language to count; English technical prose never reached 0.8
# on 22k windows of Python docstrings, while a single sentence of another language scores above 0.97.
LANGUAGE_CONFIDENCE = 0.9
# Identification among major written languages only: near-duplicates of big ones (Nigerian Pidgin for terse
# English, Wu/Cantonese for Chinese, Latin for variable soup) would otherwise read as a language switch.
LANGUAGES = (  # noqa: SIM905 - a list literal would take a line per code
    "en zh ja ko ru uk be bg sr mk fr de es pt it nl ca ro pl cs sk sl hr hu fi et lv lt sv da no is el tr az kk uz "
    "ar fa ur he hi bn mr ta te gu kn ml pa th vi id tl sw ka hy mn"
).split()
LANGUAGE_ALIASES = {"no": "da", "sr": "hr"}  # pairs the model tells apart by spelling, not by language
# repetition: a run of one token without spaces repeated this long is a loop ("0.3333333333333333" is not).
CHAR_LOOP_MIN_CHARS = 100
# repetition: a block of lines repeated back to back counts from 20 characters ("\\]" or "**Final Answer**" may
# repeat) and is sought up to 10 lines long.
MIN_LOOP_LINE_CHARS, MAX_LOOP_LINES = 20, 10
# code_in_math_reasoning: fences that hold formulas, not programs.
NON_CODE_FENCES = frozenset({"latex", "tex", "math"})
# repetition, long_paragraph: text with fewer word tokens (two letters or more) is a grid or data, not prose.
MIN_WORD_SHARE = 1 / 3
# long_paragraph: a block whose lines are all this short is a list or table, however long.
LIST_LINE_CHARS = 200

FENCE = re.compile(r"^[ \t]*```[ \t]*([^\n`]*)\n?.*?(?:^[ \t]*```[^\n]*$|\Z)", re.M | re.S)
MARKUP = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|\$[^$\n]*\$|`[^`\n]*`|\\[A-Za-z]+\*?(?:\{[^{}\n]*\})?", re.S)
NON_LETTERS = re.compile(r"[\W\d_]+")
SENTENCE_END = re.compile(
    r"(?<=[.!?;:\u2026\u3002\uff01\uff1f\uff1b\uff1a])\s+|(?<=[\u3002\uff01\uff1f\uff1b\uff0c])|\n+"
)
NON_LATIN_RUN = re.compile(r"[^A-Za-z]*[^\x00-\x7F][^A-Za-z]*")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
WORD = re.compile(r"[^\W\d_]{2}")


@dataclass(frozen=True)
class FilterInput:
    """The columns of a raw row the filters read, as plain values: filters stay testable without Parquet."""

    prompt: str  # the problem text, for language comparison
    completion: str  # the teacher's full text
    reasoning: str  # the think-block text ("" if none)
    answer: str  # text after the think block
    domain: str  # math | code | mcq | gym | text
    finish_reason: str
    completion_tokens: int | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FilterInput:
        """From a raw-part row, whose column names (records.RAW_SCHEMA) match the fields."""
        return cls(**{field.name: row[field.name] for field in fields(cls)})


def truncated(row: FilterInput, cfg: FilterConfig) -> bool:
    """Cut off by the token budget: whatever answer it holds is not the model's conclusion."""
    return row.finish_reason == "length"


def malformed_think(row: FilterInput, cfg: FilterConfig) -> bool:
    """Exactly one block must exist; a template that opened it leaves only the closing tag in the text.

    A completion without tags whose reasoning is set had it split off by the engine's reasoning parser, so it counts
    as one block. An empty block counts as missing: a reasoning sample without reasoning teaches nothing.
    """
    opens, closes = row.completion.count(THINK_OPEN), row.completion.count(THINK_CLOSE)
    if opens == closes == 0:
        return not row.reasoning or THINK_OPEN in row.reasoning or THINK_CLOSE in row.reasoning
    if closes != 1 or opens > 1 or (opens and row.completion.index(THINK_OPEN) > row.completion.index(THINK_CLOSE)):
        return True
    return not row.reasoning.strip()


def _clean(text: str) -> str:
    """Letters only: formulas, code, digits and one-letter variables make English misread as other languages."""
    text = NON_LETTERS.sub(" ", MARKUP.sub(" ", FENCE.sub(" ", text)))
    return " ".join(word for word in text.split() if len(word) > 1 or _width(word) > 1)


def _width(text: str) -> int:
    """Characters, wide (CJK) ones twice: a Chinese sentence is a third of the letters of its English translation."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


@cache
def _identifier():
    """Loaded on first use (0.3 s) and restricted once; the module-level py3langid model would be shared state."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(LANGUAGES)
    return identifier


def _language(cleaned: str, min_chars: int) -> str | None:
    """The language of already cleaned text, or None when it is too short or the model is unsure."""
    if _width(cleaned) < min_chars:
        return None
    lang, confidence = _identifier().classify(cleaned)
    return LANGUAGE_ALIASES.get(lang, lang) if confidence >= LANGUAGE_CONFIDENCE else None


def _chunks(text: str, min_chars: int) -> Iterator[str]:
    """Cleaned runs of consecutive sentences, each just long enough to judge, and the runs of non-Latin script.

    The second kind catches a Chinese or Russian clause inside an English sentence, which sentence runs dilute.
    """
    text = FENCE.sub(" ", text)
    run: list[str] = []
    for sentence in filter(None, map(_clean, SENTENCE_END.split(text))):
        run.append(sentence)
        if _width(" ".join(run)) >= min_chars:
            yield " ".join(run)
            run = []
    for match in NON_LATIN_RUN.finditer(MARKUP.sub(" ", text)):
        yield _clean(match.group())


@lru_cache(maxsize=1024)
def _prompt_languages(prompt: str, min_chars: int) -> frozenset[str]:
    """Every language the prompt is confidently written in, so a quoted passage to translate is not a switch."""
    texts = [_clean(prompt), *_chunks(prompt, min_chars)]
    return frozenset({_language(text, min_chars) for text in texts} - {None})


def language_mixing(row: FilterInput, cfg: FilterConfig) -> bool:
    """The reasoning, or one substantial chunk of it, is confidently in a language the prompt is not in.

    With a prompt too short or too technical to identify, the reasoning's own language is the reference, so a
    switch inside the reasoning is still caught. Fenced code is never judged.
    """
    text = row.reasoning or row.answer
    overall = _language(_clean(text), cfg.language_min_chars)
    expected = _prompt_languages(row.prompt, cfg.language_min_chars) or ({overall} if overall else set())
    if not expected:
        return False
    if overall and overall not in expected:
        return True
    languages = (_language(chunk, cfg.language_min_chars) for chunk in _chunks(text, cfg.language_min_chars))
    return any(lang is not None and lang not in expected for lang in languages)


@lru_cache(maxsize=16)
def _char_loop(repeats: int) -> re.Pattern[str]:
    return re.compile(rf"(\S{{1,50}})\1{{{repeats - 1},}}")


def _wordy(text: str) -> bool:
    """Mostly words, as opposed to the digits and symbols of a grid, board or table."""
    tokens = text.split()
    return bool(tokens) and sum(bool(WORD.search(token)) for token in tokens) >= MIN_WORD_SHARE * len(tokens)


def _periodic_lines(lines: list[str], repeats: int) -> bool:
    """A block of up to MAX_LOOP_LINES lines repeated back to back `repeats` times: a paragraph loop."""
    for period in range(1, MAX_LOOP_LINES + 1):
        run = 0
        for i in range(len(lines) - period):
            run = run + 1 if lines[i] == lines[i + period] else 0
            block = "\n".join(lines[i + 1 - period : i + 1]) if run >= (repeats - 1) * period else ""
            if len(block) >= MIN_LOOP_LINE_CHARS and _wordy(block):
                return True
    return False


def repetition(row: FilterInput, cfg: FilterConfig) -> bool:
    """A generation loop: a word n-gram or a whole paragraph recurring, a token repeated without spaces, or a block
    of lines repeated back to back.

    Only wordy repeats count: the grids, boards and tables of gym tasks repeat digits and symbols by design (a loop
    that never ends is caught by truncated anyway). N-grams stay within a line and count once per distinct line, and
    fenced code is skipped: move lists (Tower of Hanoi, jugs) repeat short lines by design, an answer is rightly
    restated a few times, and reasoning rewrites its program draft after draft.
    """
    text, n, repeats = row.completion, cfg.repetition_ngram, cfg.repetition_max_repeats
    lines = Counter(line.strip() for line in FENCE.sub("\n", text).splitlines())
    ngrams: Counter[tuple[str, ...]] = Counter()
    for line, count in lines.items():
        words = line.split()
        if count >= repeats and len(words) >= n and _wordy(line):
            return True
        ngrams.update(zip(*(words[i:] for i in range(n)), strict=False))
    if any(count >= repeats and _wordy(" ".join(gram)) for gram, count in ngrams.items()):
        return True
    loops = _char_loop(repeats).finditer(text)
    if any(len(m.group()) >= CHAR_LOOP_MIN_CHARS and _wordy(m.group()) for m in loops):
        return True
    return _periodic_lines([line.strip() for line in text.splitlines() if line.strip()], repeats)


def long_paragraph(row: FilterInput, cfg: FilterConfig) -> bool:
    """A wall of prose. Fenced code, data (a JSON answer) and blocks of short lines (move lists, grids, a derivation
    with a step per line) are left out: they read fine without blank lines."""
    paragraphs = PARAGRAPH_BREAK.split(FENCE.sub("\n\n", row.completion))
    return any(
        len(paragraph.strip()) > cfg.max_paragraph_chars
        and max(map(len, paragraph.splitlines())) > LIST_LINE_CHARS
        and _wordy(paragraph)
        for paragraph in paragraphs
    )


def code_in_math_reasoning(row: FilterInput, cfg: FilterConfig) -> bool:
    """R1 dropped math chains of thought that compute with programs: the student should learn to reason by hand."""
    if row.domain != "math":
        return False
    for block in FENCE.finditer(row.reasoning or row.completion):
        tag = block.group(1).strip().split(maxsplit=1)
        if not tag or tag[0].lower() not in NON_CODE_FENCES:
            return True
    return False


def length_bounds(row: FilterInput, cfg: FilterConfig) -> bool:
    """Generated tokens out of bounds; rows from a backend that reports no usage are measured in words."""
    length = row.completion_tokens if row.completion_tokens is not None else len(row.completion.split())
    return length < cfg.min_completion_tokens or (
        cfg.max_completion_tokens is not None and length > cfg.max_completion_tokens
    )


FILTERS: dict[str, Callable[[FilterInput, FilterConfig], bool]] = {
    "truncated": truncated,
    "malformed_think": malformed_think,
    "language_mixing": language_mixing,
    "repetition": repetition,
    "long_paragraph": long_paragraph,
    "code_in_math_reasoning": code_in_math_reasoning,
    "length_bounds": length_bounds,
}


def apply_filters(row: FilterInput, cfg: FilterConfig) -> list[str]:
    """Names of the enabled filters the row fails, in FILTER_NAMES order so equal rows give equal lists."""
    unknown = set(cfg.enabled) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown filters in verify.filters.enabled: {sorted(unknown)}; known: {list(FILTERS)}")
    return [name for name in FILTER_NAMES if name in cfg.enabled and FILTERS[name](row, cfg)]
