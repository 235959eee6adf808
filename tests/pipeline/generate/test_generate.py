"""`distill generate` over the openai backend against a small local fake server (tests/fake_openai.py): what a
real server does not do on demand (a reasoning field apart from the content, a too-long rejection of one problem,
a slow answer, a 404 for every request). The real engines are tested in test_generate_integration.py."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_recipe
from pipeline.config_base import RecipeError
from pipeline.generate.config import TeacherConfig
from pipeline.generate.stage import generate
from pipeline.generate.teacher.base import TeacherConfigError, logprobs_mode
from pipeline.generate.teacher.vllm_server import ManagedVLLMServer
from pipeline.models import ResolvedModel
from pipeline.parts import TOO_LONG_DIR, closed_parts
from pipeline.verify.stage import verify_run
from tests.conftest import run_distill
from tests.fake_openai import FakeOpenAIServer, Reply
from tests.pipeline.generate.test_openai_retry_policy import VLLM_NO_MODEL, VLLM_TOO_LONG

PROBLEMS = [("What is 2 + 2?", "4"), ("What is 3 + 3?", "6"), ("LONG: what is 4 + 4?", "8")]


def write_recipe(tmp_path: Path, url: str, name: str = "fake", problems=PROBLEMS, **sections) -> Path:
    """A recipe of `problems` (question, answer) answered by the scripted server at `url`; `sections` update it."""
    (tmp_path / "math.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in problems))
    recipe = {
        "name": name,
        "sources": [{"type": "file", "path": "math.jsonl", "columns": {"prompt": "question", "reference": "answer"}}],
        "sampling": {"n": 2, "max_tokens": 64, "logprobs": 0},
        "teacher": {"backend": "openai", "model": "m", "endpoints": [url], "concurrency": 4, "max_retries": 0},
        "output": {"runs_dir": str(tmp_path / "runs"), "part_rows": 100, "part_seconds": 30},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _raw(run_dir: Path) -> list[dict]:
    return ds.dataset(run_dir / "raw", format="parquet").to_table().to_pylist()


def test_completion_holds_the_reasoning_a_server_returned_apart_from_the_content(tmp_path):
    loop = "Let me check the sum once more to be completely sure of it. " * 12
    with FakeOpenAIServer(lambda body: Reply(content="The answer is \\boxed{4}.", reasoning_content=loop)) as server:
        recipe = load_recipe(write_recipe(tmp_path, server.url))
        generate(recipe, quiet=True)
    rows = _raw(recipe.run_dir)
    assert len(rows) == 2 * len(PROBLEMS)
    for row in rows:
        assert row["completion"] == f"<think>\n{loop.strip()}\n</think>\n\nThe answer is \\boxed{{4}}."
        assert row["reasoning"] == loop.strip() and row["answer"] == "The answer is \\boxed{4}."
    verify_run(recipe.run_dir, recipe.verify, quiet=True)
    verified = pq.read_table(recipe.run_dir / "verified").to_pylist()
    # the repetition filter reads `completion`: it now sees the loop that was in the reasoning field
    assert all("repetition" in r["failed_filters"] for r in verified)
    assert all("malformed_think" not in r["failed_filters"] for r in verified)


def test_a_problem_rejected_as_too_long_is_in_the_ledger_and_never_sent_again(tmp_path):
    def respond(body: dict) -> Reply:
        long = "LONG" in body["messages"][-1]["content"]
        return Reply(400, VLLM_TOO_LONG) if long else Reply(content="\\boxed{4}", reasoning_content="2 and 2 make 4.")

    with FakeOpenAIServer(respond) as server:
        path = write_recipe(tmp_path, server.url)
        first = generate(load_recipe(path), quiet=True)
        sent = server.chat_calls
        second = generate(load_recipe(path), quiet=True)
        assert server.chat_calls == sent == len(PROBLEMS), "the resume sent a request again"
    assert first["rejected_too_long"] == 1 and first["problems_answered"] == 2
    assert second["problems_resumed"] == len(PROBLEMS) and second["rejected_too_long_total"] == 1
    run_dir = tmp_path / "runs" / "fake"
    ledger = pq.read_table(closed_parts(run_dir / TOO_LONG_DIR)[0]).to_pylist()
    assert [r["error"] for r in ledger] == [f"HTTP 400: {VLLM_TOO_LONG}"]
    # not a completion: no raw row, so verify and build never see it
    assert not any("LONG" in r["prompt"] for r in _raw(run_dir))


def test_a_part_closes_after_part_seconds_while_the_teacher_is_still_busy(tmp_path):
    """The rows of a fast problem must be in a closed part before a slow one answers, not only when it does."""
    raw = tmp_path / "runs" / "fake" / "raw"
    seen: list[bool] = []

    async def wait_for_a_part() -> None:
        deadline = time.monotonic() + 8
        while not list(raw.glob("part-*.parquet")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seen.append(bool(list(raw.glob("part-*.parquet"))))

    class Watching(FakeOpenAIServer):
        async def _chat(self, request):
            body = await request.json()  # aiohttp keeps the body: the parent reads it again
            if "What is 2 + 2?" not in body["messages"][-1]["content"]:
                await wait_for_a_part()  # the teacher is busy on this one until a part has closed (or 8 s)
            return await super()._chat(request)

    with Watching() as server:
        recipe = load_recipe(write_recipe(tmp_path, server.url, output={"part_seconds": 0.5}))
        started = time.monotonic()
        generate(recipe, quiet=True)
    assert seen == [True, True], "no part closed while the slow problems were generating"
    assert time.monotonic() - started < 6
    first_part = pq.read_table(closed_parts(raw)[0]).column("prompt").to_pylist()
    assert first_part == ["What is 2 + 2?"] * 2


def test_a_wrong_model_name_exits_2_with_the_endpoints_message(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(404, VLLM_NO_MODEL)) as server:
        result = run_distill(str(write_recipe(tmp_path, server.url)), "--quiet", timeout=120)
        assert server.chat_calls <= 4  # at most one request per concurrency slot, not one per problem
    assert result.returncode == 2, result.stderr[-2000:]
    assert "HTTP 404" in result.stderr and VLLM_NO_MODEL in result.stderr


def test_generate_raises_the_configuration_error_after_saving_what_finished(tmp_path):
    script = [Reply(content="\\boxed{4}", reasoning_content="2 and 2 make 4.")]

    def respond(body: dict) -> Reply:
        return script.pop(0) if script else Reply(404, VLLM_NO_MODEL)

    with FakeOpenAIServer(respond) as server:
        recipe = load_recipe(write_recipe(tmp_path, server.url, teacher={"concurrency": 1}))
        with pytest.raises(TeacherConfigError):
            generate(recipe, quiet=True)
    assert server.chat_calls == 2
    assert len(_raw(recipe.run_dir)) == 2, "the answered problem is in a closed part"


def test_engines_we_start_measure_entropy_on_the_sampled_distribution(tmp_path):
    model = ResolvedModel(name="m", path="/models/m", revision="r")
    command = ManagedVLLMServer(model, TeacherConfig(backend="vllm-server"), tmp_path / "server.log").command()
    assert command[command.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert logprobs_mode("vllm") == logprobs_mode("vllm-server") == "processed_logprobs"


def test_rows_record_which_distribution_their_entropy_is_from(tmp_path):
    with FakeOpenAIServer() as server:
        recipe = load_recipe(write_recipe(tmp_path, server.url, sampling={"logprobs": 5}))
        generate(recipe, quiet=True)
    rows = _raw(recipe.run_dir)
    assert {json.loads(r["sampling"])["logprobs_mode"] for r in rows} == {"endpoint"}
    # three tokens with top-5 logprobs -0.5, -1.5, ... -4.5 (tests/fake_openai.py): hand-computed entropy
    weights = [math.exp(-j) for j in range(5)]
    expected = -sum(w / sum(weights) * math.log(w / sum(weights)) for w in weights)
    assert all(r["mean_token_entropy"] == pytest.approx(expected) for r in rows)


def test_resuming_with_entropies_from_another_distribution_is_refused(tmp_path):
    """openai rows carry the endpoint's logprobs; the in-process engine's are processed: they must not mix."""
    with FakeOpenAIServer() as server:
        path = write_recipe(tmp_path, server.url, sampling={"logprobs": 5})
        generate(load_recipe(path), quiet=True)
        with pytest.raises(RecipeError, match="changed: logprobs_mode"):  # refused before any engine starts
            generate(load_recipe(path, ["teacher.backend=vllm"]), quiet=True)
