"""An OpenAI-compatible endpoint that answers at once, for benchmarks of the pipeline around the teacher.

    python benchmarks/instant_openai.py            # prints "READY http://127.0.0.1:PORT/v1", serves until killed
    python benchmarks/instant_openai.py --port 8123 --completion-chars 2000

Raw asyncio streams, HTTP/1.1 with keep-alive, no framework: a benchmark of `distill generate` must measure the
client side (the openai client, rendering, rows, parts), so the server has to cost next to nothing per request and
run in its own process (its own core where there is one). Each answer body is built once per (model, n, top-k) and
served from a cache; of the request, only those three fields are read.

Endpoints: POST /v1/chat/completions (n canned choices, usage tokens, canned logprobs when asked for),
GET /v1/models (the served model), GET /stats (chat requests served, connections opened, and the wall clock of the
first and the last, so a benchmark reads the request rate the client reached; /stats?reset then counts anew).
Anything else is a 404 (so the openai backend's GET /version probe records the engine version as unknown, as for
any server that is not vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

MODEL = "instant"
LOGPROB_TOKENS = 8  # tokens per choice when logprobs are asked for


class InstantServer:
    def __init__(self, completion_chars: int = 400, model: str = MODEL):
        answer = "The answer is \\boxed{42}."
        thinking = ("Let me add the numbers step by step and check the sum. " * (completion_chars // 56 + 1))[
            : max(0, completion_chars - len(answer) - 20)
        ]
        self.content = f"<think>\n{thinking}\n</think>\n\n{answer}"
        self.model = model
        self.chat_requests = 0
        self.connections = 0  # opened: with keep-alive, about the client's concurrency, not one per request
        self.first = self.last = 0.0
        self._bodies: dict[tuple[str, int, int], bytes] = {}

    def completion(self, model: str, n: int, top_k: int) -> bytes:
        key = (model, n, top_k)
        if key not in self._bodies:
            choice = {"message": {"role": "assistant", "content": self.content}, "finish_reason": "stop"}
            tokens = 3 * n
            if top_k:
                top = [{"token": f"t{j}", "logprob": -0.5 - j, "bytes": None} for j in range(top_k)]
                content = [{"token": "t0", "logprob": -0.5, "bytes": None, "top_logprobs": top}] * LOGPROB_TOKENS
                choice["logprobs"] = {"content": content}
                tokens = LOGPROB_TOKENS * n
            body = {
                "id": "chatcmpl-instant",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": i, **choice} for i in range(n)],
                "usage": {"prompt_tokens": 20, "completion_tokens": tokens, "total_tokens": 20 + tokens},
            }
            self._bodies[key] = json.dumps(body).encode()
        return self._bodies[key]

    def route(self, method: bytes, target: bytes, body: bytes) -> tuple[int, bytes]:
        path, _, query = target.partition(b"?")
        if method == b"POST" and path == b"/v1/chat/completions":
            request = json.loads(body)
            now = time.time()
            self.first = self.first or now
            self.last = now
            self.chat_requests += 1
            top_k = (request.get("top_logprobs") or 0) if request.get("logprobs") else 0
            return 200, self.completion(request.get("model") or self.model, request.get("n") or 1, top_k)
        if method == b"GET" and path == b"/v1/models":
            return 200, json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]}).encode()
        if method == b"GET" and path == b"/stats":
            stats = {"chat_requests": self.chat_requests, "connections": self.connections}
            stats |= {"first": self.first, "last": self.last}
            if query == b"reset":  # a benchmark phase starts: count its requests alone
                self.chat_requests = self.connections = 0
                self.first = self.last = 0.0
            return 200, json.dumps(stats).encode()
        return 404, json.dumps({"error": {"message": f"no route {path.decode()}", "code": 404}}).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in turn until the client closes it (keep-alive, as httpx's pool expects)."""
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                length, close = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                status, payload = self.route(method, path, body)
                reason = b"OK" if status == 200 else b"Not Found"
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, reason, len(payload), payload)
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client closed its connection
        finally:
            writer.close()


async def serve(host: str, port: int, completion_chars: int) -> None:
    server = InstantServer(completion_chars)
    listener = await asyncio.start_server(server.handle, host, port, backlog=1024)
    bound = listener.sockets[0].getsockname()[1]
    print(f"READY http://{host}:{bound}/v1", flush=True)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed on the READY line)")
    parser.add_argument("--completion-chars", type=int, default=400, help="length of each canned completion")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.completion_chars))


if __name__ == "__main__":
    main()
