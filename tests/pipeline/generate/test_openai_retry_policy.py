"""The openai backend's retry policy on faults a real vLLM server does not produce on demand (429 with
Retry-After, 401, a 404 for every request). The real-server paths (500s, resets, timeouts, a dead endpoint, a wrong
served-model name) are tested against the embedded teacher in test_generate_integration.py; this fake only injects
the rest."""

from __future__ import annotations

import pytest

from pipeline.config_base import RecipeError
from pipeline.generate.config import SamplingConfig, TeacherConfig
from pipeline.generate.teacher.base import TeacherConfigError, TeacherRequest
from pipeline.generate.teacher.openai_client import OpenAITeacher
from tests.fake_openai import FakeOpenAIServer, Reply

# vLLM's own phrasings (vllm/renderers/params.py, vllm/entrypoints/serve/utils/api_utils.py)
VLLM_TOO_LONG = (
    "This model's maximum context length is 1024 tokens. However, your prompt contains 2000 input tokens, which "
    "exceeds this limit even without any output tokens. Please reduce the length of the input prompt."
)
VLLM_NO_MODEL = "The model `qwen-typo` does not exist."


def scripted(*replies: Reply):
    """Replies in order, then completions."""
    script = list(replies)
    return lambda body: script.pop(0) if script else Reply(content="4")


def _ask(url: str, problems: int = 1, **cfg) -> tuple[list, OpenAITeacher]:
    teacher = OpenAITeacher(
        TeacherConfig(backend="openai", endpoints=[url], **{"max_retries": 3, **cfg}), served_model="m"
    )
    requests = [TeacherRequest(f"p{i}", [{"role": "user", "content": "2+2?"}]) for i in range(problems)]
    return list(teacher.generate(requests, SamplingConfig())), teacher


def test_429_is_retried_after_the_servers_retry_after():
    with FakeOpenAIServer(scripted(Reply(429, headers={"Retry-After": "0.2"}), Reply(503))) as server:
        results, teacher = _ask(server.url)
    assert [r.completions[0].text for r in results] == ["4"]
    assert server.chat_calls == 3
    assert teacher.counters["retry_http_429"] == 1 and teacher.counters["retry_http_503"] == 1


def test_client_errors_other_than_408_and_429_stop_the_run_with_the_endpoints_message():
    with (
        FakeOpenAIServer(scripted(Reply(401, "Incorrect API key provided"))) as server,
        pytest.raises(TeacherConfigError, match=r"HTTP 401.*Incorrect API key provided"),
    ):
        _ask(server.url)
    assert server.chat_calls == 1, "a 4xx is never retried"


def test_a_wrong_model_name_stops_after_the_first_answers_not_after_every_problem():
    """A 404 on every request used to be counted as "too long for the context" for each of the problems."""
    with (
        FakeOpenAIServer(lambda body: Reply(404, VLLM_NO_MODEL, delay_s=0.05)) as server,
        pytest.raises(TeacherConfigError) as error,
    ):
        _ask(server.url, problems=50, concurrency=4)
    assert "HTTP 404" in str(error.value) and VLLM_NO_MODEL in str(error.value)
    assert "'m'" in str(error.value), "the message names the model that was asked for"
    assert server.chat_calls <= 4, f"{server.chat_calls} requests sent after the first 404 (concurrency 4)"
    assert isinstance(error.value, RecipeError), "the CLI maps it to exit code 2 (bad recipe)"


def test_a_context_length_rejection_is_final_for_that_problem_only():
    with FakeOpenAIServer(scripted(Reply(400, VLLM_TOO_LONG))) as server:
        results, teacher = _ask(server.url, problems=3, concurrency=1)
    kinds = sorted(str(r.error_kind) for r in results)
    assert kinds == ["None", "None", "rejected_too_long"]
    assert server.chat_calls == 3 and teacher.counters["retries"] == 0


def test_a_400_that_is_not_about_the_context_is_a_configuration_error():
    with (
        FakeOpenAIServer(scripted(Reply(400, "top_logprobs must be at most 0, got 5"))) as server,
        pytest.raises(TeacherConfigError, match="top_logprobs"),
    ):
        _ask(server.url, problems=5, concurrency=1)
    assert server.chat_calls == 1


def test_exhausted_retries_are_an_infra_error_not_an_empty_answer():
    with FakeOpenAIServer(scripted(*[Reply(500)] * 4)) as server:
        results, teacher = _ask(server.url)
    assert results[0].error_kind == "infra_error" and not results[0].completions
    assert server.chat_calls == 4 and teacher.counters["infra_errors"] == 1


def test_a_key_the_server_echoes_is_scrubbed_from_the_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-echoed-1234567890")
    with (
        FakeOpenAIServer(scripted(Reply(401, "Incorrect API key provided: sk-echoed-1234567890"))) as server,
        pytest.raises(TeacherConfigError) as error,
    ):
        _ask(server.url)
    assert server.authorizations[-1] == "Bearer sk-echoed-1234567890"
    assert "sk-echoed-1234567890" not in str(error.value) and "***" in str(error.value)
