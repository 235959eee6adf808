import re
from typing import ClassVar

import huggingface_hub
import pytest

from pipeline.build.publish import NO_TOKEN, publish
from tests.pipeline.build.test_card import build_dataset

EXPECTED = [
    "README.md",
    "data/test-00000-of-00001.parquet",
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
    "manifest.json",
    "plots/completion_tokens.png",
    "plots/pass_rate_by_source.png",
    "plots/weight.png",
    "stats.json",
]


class NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi instantiated: publish touched the network")


class FakeApi:
    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def test_dry_run_lists_files_without_network(tmp_path, monkeypatch, capsys, no_token):
    build_dataset(tmp_path)
    (tmp_path / "data" / "notes.txt").write_text("stray")  # not part of the build: never uploaded
    (tmp_path / "README.md.tmp").write_text("half-written")
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    assert publish(tmp_path, "me/demo", dry_run=True) == EXPECTED
    out = capsys.readouterr().out
    for name in EXPECTED:
        size = (tmp_path / name).stat().st_size
        assert any(name in line and f"{size:,}" in line for line in out.splitlines()), name
    assert "notes.txt" not in out and ".tmp" not in out


def test_missing_token_fails_before_network(tmp_path, monkeypatch, no_token):
    build_dataset(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    with pytest.raises(RuntimeError) as info:
        publish(tmp_path, "me/demo")
    assert str(info.value) == NO_TOKEN


def test_upload_is_restricted_to_the_file_list(tmp_path, monkeypatch, no_token):
    build_dataset(tmp_path)
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert publish(tmp_path, "me/demo", private=False) == EXPECTED
    (init, create, upload) = FakeApi.calls
    assert init == ("init", "hf_env")
    assert create == ("create_repo", "me/demo", {"repo_type": "dataset", "private": False, "exist_ok": True})
    kwargs = upload[1]
    assert kwargs["repo_id"] == "me/demo" and kwargs["repo_type"] == "dataset"
    assert kwargs["allow_patterns"] == EXPECTED
    assert kwargs["delete_patterns"] == ["data/*", "plots/*"]  # a previous build's shards must not linger


def test_explicit_token_wins(tmp_path, monkeypatch, no_token):
    build_dataset(tmp_path)
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    publish(tmp_path, "me/demo", token="hf_arg")
    assert FakeApi.calls[0] == ("init", "hf_arg")


def test_altered_shard_is_refused(tmp_path, monkeypatch, no_token):
    build_dataset(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    shard = tmp_path / "data" / "train-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum notices
    shard.write_bytes(bytes(data))
    for dry_run in (True, False):
        with pytest.raises(ValueError, match=re.escape("train-00001-of-00002.parquet: sha256 differs")):
            publish(tmp_path, "me/demo", dry_run=dry_run, token="hf_arg")


def test_missing_card_is_refused(tmp_path, monkeypatch):
    build_dataset(tmp_path, card=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    with pytest.raises(ValueError, match=re.escape("README.md: missing")):
        publish(tmp_path, "me/demo", dry_run=True)


def test_a_build_is_published_with_its_test_problems(tmp_path, monkeypatch, no_token):
    # `distill eval` scores a build on every test problem, solved or not: the Hub copy must carry them too.
    from pipeline.build.config import BuildConfig
    from pipeline.build.stage import build
    from tests.pipeline.build.test_build import _make_run

    _make_run(tmp_path / "run", problems=20)
    build(tmp_path / "run", BuildConfig(test_fraction=0.2), base_dir=tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    assert "test_problems.parquet" in publish(tmp_path / "run" / "dataset", "me/demo", dry_run=True)
