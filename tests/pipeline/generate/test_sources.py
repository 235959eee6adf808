"""Loading problems from every source kind: bad rows become Rejects with line numbers, ids are stable."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from pipeline.generate.config import FileSource, GymSource, HFSource, HumanEvalSource
from pipeline.generate.sources import iter_problems, load_problems, problems_digest
from pipeline.records import stable_id


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_bad_rows_rejected_with_line_numbers(tmp_path):
    write_jsonl(
        tmp_path / "probs.jsonl",
        [
            json.dumps({"prompt": "What is 1+1?", "reference": "2"}),  # 1
            '{"prompt": "broken" "reference": 1}',  # 2: invalid JSON
            "",  # 3: blank, skipped silently
            json.dumps({"question": "no prompt here"}),  # 4
            json.dumps({"prompt": "   "}),  # 5
            json.dumps(["not", "an", "object"]),  # 6
            json.dumps({"prompt": "What is 2+2?", "reference": "4"}),  # 7
        ],
    )
    with (tmp_path / "probs.jsonl").open("ab") as f:
        f.write(b'{"prompt": "caf\xe9"}\n')  # 8: Latin-1 byte, not UTF-8
        f.write(json.dumps({"prompt": "last"}).encode() + b"\n")  # 9
    problems, rejects = load_problems([FileSource(path="probs.jsonl")], tmp_path)
    assert [p.prompt for p in problems] == ["What is 1+1?", "What is 2+2?", "last"]
    assert [p.reference for p in problems] == ["2", "4", ""]
    assert all(p.source == "probs" and p.domain == "math" for p in problems)
    got = {r.line: r for r in rejects}
    assert sorted(got) == [2, 4, 5, 6, 8]
    assert got[8].reason.startswith("invalid UTF-8")
    assert got[2].reason.startswith("invalid JSON") and "delimiter" in got[2].reason
    assert got[2].row == '{"prompt": "broken" "reference": 1}'
    assert got[4].reason == "missing field 'prompt' (column 'prompt')"
    assert got[5].reason == "empty prompt"
    assert "not a JSON object" in got[6].reason and "list" in got[6].reason
    assert all(r.source == "probs" and r.file.endswith("probs.jsonl") for r in rejects)


def test_column_mapping_metadata_and_domain(tmp_path):
    write_jsonl(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"question": "Q1", "answer": "A1", "level": 3, "kind": "code"}),
            json.dumps({"question": "Q2", "answer": {"tests": ["assert f()"]}, "kind": None}),
            json.dumps({"question": "Q3", "answer": "A3", "kind": "poetry"}),
            json.dumps({"prompt": "unmapped", "answer": "x"}),
        ],
    )
    src = FileSource(
        path="qa.jsonl",
        name="qa",
        domain="text",
        columns={"prompt": "question", "reference": "answer", "domain": "kind"},
    )
    problems, rejects = load_problems([src], tmp_path)
    assert [p.prompt for p in problems] == ["Q1", "Q2"]
    assert problems[0].reference == "A1"
    assert json.loads(problems[1].reference) == {"tests": ["assert f()"]}
    assert problems[0].metadata == {"level": 3}
    assert problems[0].domain == "code"  # from the row's column
    assert problems[1].domain == "text"  # null column falls back to the source's domain
    assert [(r.line, r.source) for r in rejects] == [(3, "qa"), (4, "qa")]
    assert "'poetry'" in rejects[0].reason and "domain" in rejects[0].reason
    assert rejects[1].reason == "missing field 'prompt' (column 'question')"


def test_invalid_source_domain_and_missing_file_are_fatal(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": "p"})])
    with pytest.raises(ValueError, match="'poetry'"):
        load_problems([FileSource(path="a.jsonl", domain="poetry")], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"file source 'missing'.*missing\.jsonl"):
        load_problems([FileSource(path="missing.jsonl")], tmp_path)


def test_stable_ids_explicit_ids_and_duplicates(tmp_path):
    rows = [("P1", "R1"), ("P2", "R2"), ("P1", "R9")]
    write_jsonl(tmp_path / "s.jsonl", [json.dumps({"prompt": p, "reference": r}) for p, r in rows])
    first, _ = load_problems([FileSource(path="s.jsonl")], tmp_path)
    again, _ = load_problems([FileSource(path=str(tmp_path / "s.jsonl"))], tmp_path / "elsewhere")
    assert [p.id for p in first] == [p.id for p in again]
    assert len({p.id for p in first}) == 3  # same prompt, different reference: different id
    assert first[0].id == stable_id("s", "P1", "R1")

    write_jsonl(
        tmp_path / "ids.jsonl",
        [
            json.dumps({"uid": 7, "prompt": "a"}),
            json.dumps({"uid": "x", "prompt": "b"}),
            json.dumps({"uid": 7, "prompt": "c"}),
        ],
    )
    problems, rejects = load_problems([FileSource(path="ids.jsonl", columns={"id": "uid"})], tmp_path)
    assert [p.id for p in problems] == ["7", "x"]
    assert [(r.line, r.reason) for r in rejects] == [(3, "duplicate id 7 (first at line 1)")]


def test_duplicates_across_sources_and_limit(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [json.dumps({"id": "k", "prompt": "a"})])
    write_jsonl(tmp_path / "b.jsonl", [json.dumps({"id": f, "prompt": f}) for f in ("k", "m", "n", "o")])
    problems, rejects = load_problems([FileSource(path="a.jsonl"), FileSource(path="b.jsonl", limit=2)], tmp_path)
    assert [p.id for p in problems] == ["k", "m", "n"]  # the duplicate does not count toward the limit
    assert len(rejects) == 1 and rejects[0].source == "b" and rejects[0].line == 1
    assert "duplicate id k" in rejects[0].reason and "a.jsonl line 1" in rejects[0].reason


def test_parquet_rows(tmp_path):
    table = pa.table(
        {
            "qid": ["a", None, "c", "a", None],
            "question": ["Q1", "Q2", "", "Q4", "Q5"],
            "answer": ["1", "2", "3", "4", "5"],
            "kind": ["math", "code", None, "math", "nope"],
            "extra": [1, 2, 3, 4, 5],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)  # several batches
    columns = {"id": "qid", "prompt": "question", "reference": "answer", "domain": "kind"}
    src = FileSource(path="p.parquet", columns=columns)
    problems, rejects = load_problems([src], tmp_path)
    assert [p.prompt for p in problems] == ["Q1", "Q2"]
    assert problems[0].id == "a" and problems[1].id == stable_id("p", "Q2", "2")
    assert [p.domain for p in problems] == ["math", "code"]
    assert problems[1].metadata == {"extra": 2}
    assert [r.line for r in rejects] == [3, 4, 5]
    assert rejects[0].reason == "empty prompt"
    assert rejects[1].reason == "duplicate id a (first at line 1)"
    assert "'nope'" in rejects[2].reason
    assert json.loads(rejects[2].row)["question"] == "Q5"
    again, _ = load_problems([src], tmp_path)
    assert [p.id for p in again] == [p.id for p in problems]

    pq.write_table(pa.table({"question": ["only"]}), tmp_path / "q.parquet")
    _, rejects = load_problems([FileSource(path="q.parquet")], tmp_path)
    assert [(r.line, r.reason) for r in rejects] == [(1, "missing field 'prompt' (column 'prompt')")]


def test_reasoning_gym_deterministic(tmp_path):
    src = GymSource(tasks=["basic_arithmetic", "leg_counting"], size=3, seed=5)
    problems, rejects = load_problems([src], tmp_path)
    again, _ = load_problems([src], tmp_path)
    assert rejects == []
    assert len(problems) == 6
    assert [(p.id, p.prompt, p.reference) for p in problems] == [(p.id, p.prompt, p.reference) for p in again]
    assert problems[0].id.startswith("reasoning_gym-basic_arithmetic-5-0-")
    assert problems[3].id.startswith("reasoning_gym-leg_counting-5-0-")
    assert all(p.domain == "gym" for p in problems)
    ref = json.loads(problems[4].reference)
    entry = reasoning_gym.create_dataset("leg_counting", size=3, seed=5)[1]
    assert ref == {
        "task": "leg_counting",
        "config": {},
        "seed": 5,
        "size": 3,
        "index": 1,
        "question": problems[4].prompt,
        "answer": entry["answer"],
    }
    assert entry["question"] == problems[4].prompt  # task, config, seed and index regenerate the very entry
    assert problems[4].metadata == {"task": "leg_counting", "config": {}, "seed": 5, "index": 1}
    other, _ = load_problems([GymSource(tasks=["basic_arithmetic"], size=3, seed=6)], tmp_path)
    assert [p.prompt for p in other] != [p.prompt for p in problems[:3]]
    config = {"min_terms": 2, "max_terms": 2, "max_digits": 1}
    sums, _ = load_problems([GymSource(tasks=["chain_sum"], size=20, seed=5, config=config)], tmp_path)
    assert {
        reasoning_gym.create_dataset("chain_sum", size=20, seed=5, **config)[i]["metadata"]["num_terms"]
        for i in range(20)
    } == {2}
    assert all(json.loads(p.reference)["config"] == config for p in sums)
    with pytest.raises(ValueError, match="'basic_arithmetc'; did you mean basic_arithmetic"):
        load_problems([GymSource(tasks=["basic_arithmetc"])], tmp_path)


def test_a_gym_problem_id_changes_with_its_config(tmp_path):
    # Another difficulty is another problem: resuming must not answer it with the rows of the old one.
    hard = GymSource(tasks=["chain_sum"], size=3, seed=5, config={"min_terms": 4, "max_terms": 4})
    easy = GymSource(tasks=["chain_sum"], size=3, seed=5, config={"min_terms": 2, "max_terms": 2})
    (hard_problems, _), (easy_problems, _) = load_problems([hard], tmp_path), load_problems([easy], tmp_path)
    assert not {p.id for p in hard_problems} & {p.id for p in easy_problems}
    assert [p.id for p in load_problems([hard], tmp_path)[0]] == [p.id for p in hard_problems]  # and stays stable
    # A setting that changes no question (here, one the default already has) still names another task config.
    same = GymSource(tasks=["chain_sum"], size=3, seed=5, config={"min_terms": 4, "max_terms": 4, "min_digits": 1})
    assert [p.prompt for p in load_problems([same], tmp_path)[0]] == [p.prompt for p in hard_problems]
    assert not {p.id for p in load_problems([same], tmp_path)[0]} & {p.id for p in hard_problems}


def test_humaneval(tmp_path):
    problems, rejects = load_problems([HumanEvalSource()], tmp_path)
    assert rejects == []
    assert [p.id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p.domain == "code" and p.source == "humaneval" for p in problems)
    ref = json.loads(problems[0].reference)
    assert ref["entry_point"] == "has_close_elements" and "def check" in ref["tests"]
    assert "def has_close_elements" in problems[0].prompt
    assert "canonical_solution" in problems[0].metadata
    limited = list(iter_problems(HumanEvalSource(limit=3), tmp_path, []))
    assert [p.id for p in limited] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_hf_local_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"question": ["Q1", "", "Q3"], "answer": ["1", "2", "3"], "source_url": ["u1", "u2", "u3"]}
    ).save_to_disk(str(tmp_path / "ds"))
    src = HFSource(path="ds", columns={"prompt": "question", "reference": "answer"})
    problems, rejects = load_problems([src], tmp_path)
    assert [(p.prompt, p.reference, p.source) for p in problems] == [("Q1", "1", "ds"), ("Q3", "3", "ds")]
    assert problems[0].metadata == {"source_url": "u1"}
    assert [(r.line, r.reason) for r in rejects] == [(2, "empty prompt")]

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["e1"]}),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    test, _ = load_problems([HFSource(path="dd", split="test", name="dd", domain="text")], tmp_path)
    assert [(p.prompt, p.domain) for p in test] == [("e1", "text")]
    train, _ = load_problems([HFSource(path=str(tmp_path / "dd"), limit=1)], tmp_path)
    assert [p.prompt for p in train] == ["t1"]
    with pytest.raises(ValueError, match="validation"):
        load_problems([HFSource(path="dd", split="validation")], tmp_path)


def test_hf_folder_of_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [json.dumps({"prompt": "x1"}), json.dumps({"prompt": "x2"})])
    problems, _ = load_problems([HFSource(path="files")], tmp_path)
    assert [p.prompt for p in problems] == ["x1", "x2"]


# ---- an edited row that keeps its id is another problem


def test_the_problems_digest_covers_each_rows_content_not_only_its_id(tmp_path):
    rows = [{"id": "q1", "prompt": "2+2?", "reference": "4"}, {"id": "q2", "prompt": "1+3?", "reference": "4"}]
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    before = problems_digest(load_problems([FileSource(path=str(path))], tmp_path)[0])
    assert problems_digest(load_problems([FileSource(path=str(path))], tmp_path)[0]) == before
    for edit in ({"reference": "5"}, {"prompt": "2+2=?"}, {"domain": "text"}, {"note": "extra column"}):
        write_jsonl(path, [json.dumps(rows[0] | edit), json.dumps(rows[1])])
        assert problems_digest(load_problems([FileSource(path=str(path))], tmp_path)[0]) != before, edit


def test_resuming_a_generation_after_a_row_was_edited_under_its_id_is_refused(tmp_path, monkeypatch):
    from pipeline.config import load_recipe
    from pipeline.config_base import RecipeError
    from pipeline.generate.stage import generate
    from tests.fake_openai import FakeOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    path = tmp_path / "p.jsonl"
    rows = [{"id": "q1", "prompt": "2+2?", "reference": "4"}, {"id": "q2", "prompt": "1+3?", "reference": "4"}]
    write_jsonl(path, [json.dumps(r) for r in rows])
    with FakeOpenAIServer() as server:
        recipe = load_recipe(
            None,
            defaults={
                "name": "edited",
                "sources": [{"type": "file", "path": str(path)}],
                "teacher": {"backend": "openai", "model": "m", "endpoints": [server.url]},
                "output": {"runs_dir": str(tmp_path / "runs")},
            },
        )
        generate(recipe, quiet=True)
        write_jsonl(path, [json.dumps(r) for r in [*rows, {"id": "q3", "prompt": "3+3?", "reference": "6"}]])
        assert generate(recipe, quiet=True)["problems_answered"] == 1  # a new row is resumed: only q3 is asked
        write_jsonl(path, [json.dumps(rows[0] | {"reference": "5"}), json.dumps(rows[1])])
        with pytest.raises(RecipeError, match=r"problem q1 changed since it was generated"):
            generate(recipe, quiet=True)
        assert server.chat_calls == 3


def test_shards_stream_disjoint_problems_and_rejects_whose_union_is_the_whole_source(tmp_path):
    from pipeline.executor import Shard
    from pipeline.generate.sources import stream_problems

    lines = [json.dumps({"id": f"q{i}", "prompt": f"{i}+{i}?", "reference": str(2 * i)}) for i in range(40)]
    lines += [json.dumps({"id": f"bad{i}", "prompt": ""}) for i in range(10)]  # invalid, with an id
    lines += ["{not json"] * 5 + [
        json.dumps({"prompt": f"no id {i}"}) for i in range(5)
    ]  # without an id: 5 bad, 5 good
    lines += [json.dumps({"id": "q3", "prompt": "again", "reference": "6"})]  # a duplicate id
    write_jsonl(tmp_path / "s.jsonl", lines)
    # (problems, rejects) of the whole source: with a limit of 30 the stream ends before the bad rows
    for source, counts in (
        (FileSource(path="s.jsonl"), (40 + 5, 10 + 5 + 1)),
        (FileSource(path="s.jsonl", limit=30), (30, 0)),
    ):
        whole_rejects: list = []
        whole = [p.id for p in stream_problems([source], tmp_path, whole_rejects)]
        ids, rejects = [], []
        for index in range(3):
            shard_rejects: list = []
            mine = [p.id for p in stream_problems([source], tmp_path, shard_rejects, Shard(index, 3))]
            assert all(Shard(index, 3).owns(i) for i in mine)
            ids += mine
            rejects += shard_rejects
        assert sorted(ids) == sorted(whole) and len(ids) == len(set(ids))
        key = sorted((r.line, r.reason) for r in rejects)
        assert key == sorted((r.line, r.reason) for r in whole_rejects), "a reject lost or reported twice"
        assert (len(whole), len(whole_rejects)) == counts
