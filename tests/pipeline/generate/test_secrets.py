"""API keys come from the environment or the recipe, reach the endpoint, and are never written to a run folder,
a card, a log or a hash (acceptance: `grep -r KEY runs/NAME` finds nothing after generate and build)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config_base import RecipeError
from pipeline.generate.config import TeacherConfig
from pipeline.run import RunRecipe, _stage_hashes
from tests.conftest import ROOT
from tests.fake_openai import FakeOpenAIServer, Reply
from tests.pipeline.generate.test_generate import write_recipe

ENV_KEY = "sk-env-8f3a1c0b9d7e6f5a4b3c2d1e"
RECIPE_KEY = "sk-recipe-0a1b2c3d4e5f6a7b8c9d"
OTHER_ENV_KEY = "sk-other-5e4d3c2b1a0f9e8d7c6b"


def _distill(*args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_no_key_reaches_the_run_folder_after_generate_and_build(tmp_path):
    answer = Reply(content="The answer is \\boxed{4}.", reasoning_content="Two and two make four, so it is 4.")
    with FakeOpenAIServer(lambda body: answer) as server:
        teacher, sampling = {"api_key": RECIPE_KEY}, {"logprobs": 5}
        path = write_recipe(tmp_path, server.url, name="secret", teacher=teacher, sampling=sampling)
        env = dict(os.environ, OPENAI_API_KEY=ENV_KEY)
        generated = _distill("generate", str(path), "--quiet", env=env)
        assert generated.returncode == 0, generated.stderr[-3000:]
        run_dir = tmp_path / "runs" / "secret"
        built = _distill("build", str(run_dir), env=env)
        assert built.returncode == 0, built.stderr[-3000:]
    assert set(server.authorizations) == {f"Bearer {RECIPE_KEY}"}, "the recipe's key is the one sent"
    assert (run_dir / "dataset" / "README.md").is_file() and (run_dir / "recipe.yaml").is_file()
    for key in (ENV_KEY, RECIPE_KEY):
        found = subprocess.run(["grep", "-r", "-l", key, str(run_dir)], capture_output=True, text=True)
        assert found.returncode == 1, f"{key} written to {found.stdout}"
        assert key not in generated.stdout + generated.stderr + built.stdout + built.stderr
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["teacher"]["api_key"] is None


def test_the_key_is_in_no_stage_hash(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "What is 2 + 2?", "reference": "4"}\n')

    def hashes(key: str | None) -> dict:
        teacher = {"backend": "openai", "model": "m", "endpoints": ["http://127.0.0.1:1/v1"], "api_key": key}
        sources = [{"type": "file", "path": "x.jsonl"}]
        recipe = {"name": "r", "sources": sources, "teacher": teacher, "eval": {}, "base_dir": str(tmp_path)}
        return _stage_hashes(RunRecipe.model_validate(recipe))

    assert hashes(RECIPE_KEY) == hashes(OTHER_ENV_KEY), "a rotated key must not re-run a stage"


def test_each_endpoint_reads_its_own_key_variable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("SECOND_ENDPOINT_KEY", OTHER_ENV_KEY)
    cfg = TeacherConfig(
        backend="openai",
        endpoints=["http://a/v1", {"url": "http://b/v1", "api_key_env": "SECOND_ENDPOINT_KEY"}],
    )
    assert cfg.endpoint_keys() == [("http://a/v1", ENV_KEY), ("http://b/v1", OTHER_ENV_KEY)]
    assert cfg.urls() == ["http://a/v1", "http://b/v1"]
    monkeypatch.delenv("OPENAI_API_KEY")
    assert cfg.endpoint_keys()[0] == ("http://a/v1", "EMPTY"), "a local server needs no key"
    with pytest.raises(RecipeError, match="MISSING_KEY is not set"):
        TeacherConfig(backend="openai", endpoints=["http://a/v1"], api_key_env="MISSING_KEY").endpoint_keys()


def test_a_printed_or_saved_recipe_masks_the_key():
    cfg = TeacherConfig(backend="openai", endpoints=["http://a/v1"], api_key=RECIPE_KEY)
    assert RECIPE_KEY not in repr(cfg) and RECIPE_KEY not in str(cfg.model_dump())
    assert cfg.model_dump(mode="json")["api_key"] is None
    assert cfg.model_copy().api_key.get_secret_value() == RECIPE_KEY, "in-memory copies keep it for the client"
