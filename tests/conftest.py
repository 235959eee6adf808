"""Shared fixtures: the embedded teacher and one real vLLM server, started once per test session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from pipeline.generate.config import TeacherConfig
from pipeline.generate.teacher.vllm_server import ManagedVLLMServer
from pipeline.models import EMBEDDED_ALIAS, resolve_model

ROOT = Path(__file__).resolve().parent.parent
# Small enough to keep the suite inside its time budget on 2 cores, large enough to span several parts.
# No per-request seed: the openai backend would send it, and vLLM's CPU build crashes on seeded chunked prefills.
SMALL_SAMPLING = {"n": 2, "max_tokens": 24, "temperature": 0.6, "top_p": 0.95, "logprobs": 5, "seed": None}
SMALL_TEACHER = {"model": EMBEDDED_ALIAS, "max_model_len": 1024, "max_num_seqs": 32}


@pytest.fixture(scope="session")
def embedded_model():
    return resolve_model(EMBEDDED_ALIAS)


@pytest.fixture(scope="session")
def vllm_server(embedded_model, tmp_path_factory):
    """The project's own managed server (the `vllm-server` backend's machinery), shared by all tests."""
    cfg = TeacherConfig(backend="vllm-server", **SMALL_TEACHER)
    server = ManagedVLLMServer(embedded_model, cfg, tmp_path_factory.mktemp("server") / "vllm-server.log")
    server.start()
    yield server
    server.stop()
    assert server.process.poll() is not None, "the managed server outlived the test session"


def small_recipe(tmp_path: Path, name: str, problems: int = 12, **sections) -> Path:
    """A recipe over the first `problems` demo math problems plus 4 reasoning-gym problems."""
    lines = (ROOT / "data" / "demo_math.jsonl").read_text().splitlines()[:problems]
    (tmp_path / "math.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {
        "name": name,
        "sources": [
            {"type": "file", "path": "math.jsonl", "columns": {"prompt": "question", "reference": "answer"}},
            {"type": "reasoning_gym", "tasks": ["basic_arithmetic"], "size": 4, "seed": 1},
        ],
        "sampling": SMALL_SAMPLING,
        "teacher": dict(SMALL_TEACHER),
        "output": {"runs_dir": str(tmp_path / "runs"), "part_rows": 4, "part_seconds": 30},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def sigint_as_in_a_terminal() -> None:
    """Popen preexec_fn: a job started in the background of a script inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt; restoring the default makes a test's Ctrl-C reach the child wherever the suite runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def distill_command(*args: str) -> list[str]:
    """`distill generate ARGS` as a real process (tests kill it, interrupt it, read its exit code)."""
    return [sys.executable, "-m", "pipeline.cli", "generate", *args]


def run_distill(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    return subprocess.run(distill_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_raw(run_dir: Path):
    return ds.dataset(run_dir / "raw", format="parquet").to_table()


def sample_keys(run_dir: Path) -> list[tuple[str, int]]:
    table = read_raw(run_dir)
    return list(zip(table.column("problem_id").to_pylist(), table.column("sample_index").to_pylist(), strict=False))


def read_stats(run_dir: Path, stage: str = "generate") -> dict:
    return json.loads((run_dir / "stats.json").read_text())[stage]
