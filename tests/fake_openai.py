"""A tiny OpenAI-compatible chat server for tests of what a real vLLM server does not produce on demand: scripted
error statuses, a reasoning field split from the content, a slow answer. It runs an aiohttp app on 127.0.0.1 in a
daemon thread and records every chat request (its JSON body and Authorization header)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    """One answer to a chat request: an error status with a message, or a completion (n copies of one choice)."""

    status: int = 200
    message: str = ""  # the error message of a non-200 reply
    headers: dict[str, str] = field(default_factory=dict)
    content: str = "The answer is \\boxed{4}."
    reasoning_content: str | None = None  # vLLM's reasoning parser field
    delay_s: float = 0.0


def completion_body(request_body: dict, reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.content}
    if reply.reasoning_content is not None:
        message["reasoning_content"] = reply.reasoning_content
    n = request_body.get("n") or 1
    choices = [{"index": i, "message": message, "finish_reason": "stop"} for i in range(n)]
    k = request_body.get("top_logprobs") or 0
    if request_body.get("logprobs") and k:  # three tokens, each with the same top-k alternatives
        top = [{"token": f"t{j}", "logprob": -0.5 - j, "bytes": None} for j in range(k)]
        tokens = [{"token": "t0", "logprob": -0.5, "bytes": None, "top_logprobs": top}] * 3
        for choice in choices:
            choice["logprobs"] = {"content": tokens}
    usage = {"prompt_tokens": 5, "completion_tokens": 3 * n, "total_tokens": 5 + 3 * n}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": choices, "usage": usage}


class FakeOpenAIServer:
    """Answers chat requests with `respond(body) -> Reply` (default: a completion), GET /v1/models with one model."""

    def __init__(self, respond: Callable[[dict], Reply] | None = None):
        self.respond = respond or (lambda body: Reply())
        self.requests: list[dict] = []  # chat bodies in arrival order
        self.authorizations: list[str] = []  # Authorization header of every request, /v1/models included
        self.url = ""
        self._ready = threading.Event()

    @property
    def chat_calls(self) -> int:
        return len(self.requests)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("Authorization", ""))
        reply = self.respond(body)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            error = {
                "error": {"message": reply.message or "scripted", "type": "BadRequestError", "code": reply.status}
            }
            return web.json_response(error, status=reply.status, headers=reply.headers)
        return web.json_response(completion_body(body, reply))

    async def _models(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]})

    def __enter__(self) -> FakeOpenAIServer:
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
        if not self._ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
