"""Duplicate and contamination checks the dataset builder runs over the stream of verified completions.

Three separate questions get three separate answers, so each dropped row can carry its own reason:

- exact duplicates (same normalized prompt and answer) waste training steps on one sample twice;
- near-duplicate prompts (templated or lightly reworded problems) over-weight one problem in the mix; these use
  MinHash + LSH from `datasketch`, because comparing every new prompt with every earlier one is quadratic and the
  LSH index answers "anything similar?" in roughly constant time per prompt with a fixed-size signature each;
- contaminated rows (sharing a word n-gram with an evaluation problem) would inflate the scores the eval stage
  reports, so any overlap drops the row; n-grams survive rewording, casing and added context that exact matching
  would miss.

Memory is bounded by the number of unique prompts and the size of the eval sets, never by the number of rows: the
classes keep only fixed-size digests and signatures, never row text.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasketch import MinHash, MinHashLSH

_NON_ALNUM = re.compile(r"[\W_]+")


def normalize_for_dedup(text: str) -> str:
    """The text that duplicate keys, MinHash shingles and contamination n-grams are computed from: case, Unicode
    forms, punctuation and spacing folded, since they do not make a different problem or trace.

    It compares whole prompts and traces, where folding every sign is safe. The normalizers of a single answer differ
    on purpose: the voting key `normalize_for_voting` keeps signs and operators ("-3" is not "3"), and the text
    verifier's SQuAD-style `normalize_for_text_verdict` also drops articles.

    Decimal points become spaces too ("3.5" -> "3 5"); both sides of every comparison get the same treatment, so
    that only costs distinguishing "3.5" from "3 5", which never separates two real problems.
    """
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _digest(text: str, size: int = 16) -> bytes:
    # blake2b rather than hash(): stable across processes (PYTHONHASHSEED), so decisions are reproducible.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).digest()


def _word_ngrams(words: list[str], n: int) -> Iterator[str]:
    return (" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


class ExactDedup:
    """Remembers normalized (prompt, answer) pairs as 16-byte digests: a fixed cost per unique pair, no text."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen(self, prompt: str, answer: str) -> bool:
        """True when this pair was seen before; records it otherwise."""
        # A separator that normalization cannot produce keeps ("a b", "c") apart from ("a", "b c").
        key = _digest(normalize_for_dedup(prompt) + "\x00" + normalize_for_dedup(answer))
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


class NearDuplicatePrompts:
    """Flags a prompt whose estimated Jaccard similarity to an earlier prompt reaches `threshold`.

    Shingles are word 3-grams of the normalized prompt: character shingles make every prompt in one template look
    alike, while longer word n-grams let a single changed word break too many shingles. A prompt shorter than the
    shingle becomes one shingle of its whole text, so it only matches the same short prompt.

    LSH candidates are re-checked against the stored signature (LSH alone admits false positives), and the earliest
    inserted match is reported so the decision does not depend on set iteration order.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, shingle: int = 3, seed: int = 1) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, tuple[int, np.ndarray]] = {}  # problem_id -> (insertion order, hash values)

    def _minhash(self, prompt: str) -> MinHash:
        words = normalize_for_dedup(prompt).split()
        shingles = list(_word_ngrams(words, self.shingle)) if len(words) >= self.shingle else [" ".join(words)]
        minhash = MinHash(num_perm=self.num_perm, seed=self.seed)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def check(self, problem_id: str, prompt: str) -> str | None:
        """The problem_id of an earlier near-duplicate prompt, or None after recording this one.

        Other samples of an already recorded problem_id are not duplicates of themselves and return None.
        """
        if problem_id in self._signatures:
            return None
        minhash = self._minhash(prompt)
        matches = []
        for candidate in self._lsh.query(minhash):
            order, hashvalues = self._signatures[candidate]
            if np.count_nonzero(hashvalues == minhash.hashvalues) / self.num_perm >= self.threshold:
                matches.append((order, candidate))
        if matches:
            return min(matches)[1]
        self._lsh.insert(problem_id, minhash)
        self._signatures[problem_id] = (len(self._signatures), minhash.hashvalues)
        return None


class Decontaminator:
    """Finds rows that share a word n-gram with any evaluation text.

    Eval n-grams are kept as 8-byte digests mapped to the first eval set that contains them. Eval texts shorter than
    n words have no n-gram, so they are matched whole (normalized) against rows that are equally short.
    """

    def __init__(self, eval_texts: Iterable[tuple[str, str]], n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be at least 1, got {n}")
        self.n = n
        self._names: list[str] = []
        index_of: dict[str, int] = {}
        self._ngrams: dict[bytes, int] = {}  # digest -> index into _names of the first eval set holding it
        self._short: dict[bytes, int] = {}
        for name, text in eval_texts:
            if name not in index_of:
                index_of[name] = len(self._names)
                self._names.append(name)
            index = index_of[name]
            words = normalize_for_dedup(text).split()
            if not words:  # an empty eval text would otherwise "contaminate" every empty row
                continue
            if len(words) < n:
                self._short.setdefault(_digest(" ".join(words), 8), index)
            for gram in _word_ngrams(words, n):
                self._ngrams.setdefault(_digest(gram, 8), index)

    def check(self, text: str) -> str | None:
        """The name of the earliest-listed eval set sharing an n-gram with `text`, or None when it is clean."""
        words = normalize_for_dedup(text).split()
        if len(words) < self.n:
            index = self._short.get(_digest(" ".join(words), 8))
            return None if index is None else self._names[index]
        hits = [self._ngrams.get(_digest(gram, 8)) for gram in _word_ngrams(words, self.n)]
        found = [index for index in hits if index is not None]
        return self._names[min(found)] if found else None


def _hf_texts(path: Path, field: str) -> Iterator[tuple[str, str]]:
    import datasets

    from pipeline.generate.sources import load_local_dataset

    loaded = load_local_dataset(path)
    for split in loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]:
        if field not in split.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {split.column_names})")
        for text in split[field]:
            if text is not None:
                yield path.name, str(text)


def load_eval_texts(path: Path, field: str = "prompt") -> Iterator[tuple[str, str]]:
    """Yield (eval set name, text) from a JSONL or Parquet eval file (the name is the file stem), or from a Hugging
    Face dataset in a local folder (every split; the name is the folder's).

    Streams the file so a large eval set never sits in memory as rows.
    """
    path = Path(path)
    if path.is_dir():
        yield from _hf_texts(path, field)
        return
    if not path.is_file():
        raise FileNotFoundError(f"eval set file not found: {path}")
    name = path.stem
    if path.suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no column {field!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield name, str(text)
        return
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row:
                raise ValueError(f"{path}:{line_number}: no field {field!r}")
            yield name, str(row[field])
