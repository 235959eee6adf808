"""The openai backend's retry policy on faults a real vLLM server does not produce on demand (429 with
Retry-After, 401). The real-server paths (500s, resets, timeouts, a dead endpoint, a too-long prompt) are tested
against the embedded teacher in test_generate_integration.py; this fake only injects the rest."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from pipeline.config import SamplingConfig, TeacherConfig
from pipeline.teacher.base import TeacherRequest
from pipeline.teacher.openai_client import OpenAITeacher

COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


class ScriptedServer:
    """Answers chat requests from a script of (status, headers) pairs, then with COMPLETION."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script = list(script)
        self.chat_calls = 0
        self.url = ""
        self._ready = threading.Event()

    async def _chat(self, request: web.Request) -> web.Response:
        self.chat_calls += 1
        if self.script:
            status, headers = self.script.pop(0)
            return web.json_response(
                {"error": {"message": "scripted", "code": status}}, status=status, headers=headers
            )
        return web.json_response(COMPLETION)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]})

    def __enter__(self) -> ScriptedServer:
        def serve() -> None:
            async def main() -> None:
                app = web.Application()
                app.router.add_post("/v1/chat/completions", self._chat)
                app.router.add_get("/v1/models", self._models)
                runner = web.AppRunner(app)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
                self._stop = asyncio.Event()
                self._loop = asyncio.get_running_loop()
                self._ready.set()
                await self._stop.wait()
                await runner.cleanup()

            asyncio.run(main())

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _ask(url: str) -> tuple[list, OpenAITeacher]:
    teacher = OpenAITeacher(TeacherConfig(backend="openai", endpoints=[url], max_retries=3), served_model="m")
    results = list(teacher.generate([TeacherRequest("p1", [{"role": "user", "content": "2+2?"}])], SamplingConfig()))
    return results, teacher


def test_429_is_retried_after_the_servers_retry_after():
    with ScriptedServer([(429, {"Retry-After": "0.2"}), (503, {})]) as server:
        results, teacher = _ask(server.url)
    assert [r.completions[0].text for r in results] == ["4"]
    assert server.chat_calls == 3
    assert teacher.counters["retry_http_429"] == 1 and teacher.counters["retry_http_503"] == 1


def test_client_errors_other_than_408_and_429_are_final():
    with ScriptedServer([(401, {})]) as server:
        results, teacher = _ask(server.url)
    assert results[0].error_kind == "rejected" and "401" in results[0].error
    assert server.chat_calls == 1 and teacher.counters["retries"] == 0


def test_exhausted_retries_are_an_infra_error_not_an_empty_answer():
    with ScriptedServer([(500, {})] * 4) as server:
        results, teacher = _ask(server.url)
    assert results[0].error_kind == "infra_error" and not results[0].completions
    assert server.chat_calls == 4 and teacher.counters["infra_errors"] == 1
