"""Tests for tests/fault_proxy.py (the fault-injecting reverse proxy used by integration tests).

The unit under test is the proxy itself, so the upstream here is a tiny real aiohttp server
started in a background thread on 127.0.0.1 (not vLLM).
"""

from __future__ import annotations

import asyncio
import gzip
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from aiohttp import web

from tests.fault_proxy import FAULT_KINDS, FaultProxy

pytestmark = [
    pytest.mark.timeout(60),
    # A crash in the proxy's (or fake upstream's) thread must fail the test, not just warn.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

CHAT = "/v1/chat/completions"


class _Upstream:
    """Minimal OpenAI-ish upstream server running on its own loop in a thread."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.last_headers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""

    def _hit(self, request: web.Request) -> None:
        with self._lock:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            self.last_headers = dict(request.headers)

    async def _chat(self, request: web.Request) -> web.Response:
        self._hit(request)
        body = await request.json()
        return web.json_response(
            {"object": "chat.completion", "echo": body, "query": dict(request.query)},
            status=200,
            headers={"X-Upstream": "yes"},
        )

    async def _health(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _created(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(status=201, body=await request.read(), content_type="application/octet-stream")

    async def _gzip(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.Response(
            body=gzip.compress(b'{"compressed": true}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def _slow(self, request: web.Request) -> web.Response:
        self._hit(request)
        await asyncio.sleep(30)
        return web.Response(text="slow")

    async def _not_found(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"error": "nope"}, status=404)

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post(CHAT, self._chat)
        app.router.add_get(CHAT, self._chat_get)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_put("/created", self._created)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _chat_get(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"method": "GET"})

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._main(ready))
            finally:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                asyncio.set_event_loop(None)
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self.url

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture()
def upstream():
    up = _Upstream()
    up.start()
    yield up
    up.stop()


def _expected_faults(seed: int, failure_rate: float, n: int) -> list[str | None]:
    rng = random.Random(seed)
    out: list[str | None] = []
    for _ in range(n):
        out.append(rng.choice(FAULT_KINDS) if rng.random() < failure_rate else None)
    return out


def _classify(client: httpx.Client, url: str, payload: dict) -> str:
    try:
        r = client.post(url, json=payload)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "connection_error"
    if r.status_code == 500:
        assert r.json()["error"]["code"] == 500
        return "500"
    assert r.status_code == 200, r.text
    assert r.json()["echo"] == payload
    return "ok"


def test_rejects_non_loopback_upstream():
    with pytest.raises(ValueError):
        FaultProxy("http://10.1.2.3:8000")
    with pytest.raises(ValueError):
        FaultProxy("http://example.com:8000")
    with pytest.raises(ValueError):
        FaultProxy("http://127.0.0.1:8000", failure_rate=1.5)


def test_forwards_everything_with_zero_failure_rate(upstream):
    n = 20
    with FaultProxy(upstream.url, failure_rate=0.0, seed=0) as proxy:
        assert proxy.url and proxy.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=proxy.url, timeout=5.0) as c:
            for i in range(n):
                payload = {"model": "m", "messages": [{"role": "user", "content": f"hi {i} é"}]}
                r = c.post(CHAT, json=payload, params={"i": str(i)}, headers={"X-Test": "abc"})
                assert r.status_code == 200
                assert r.headers["X-Upstream"] == "yes"
                assert r.json() == {"object": "chat.completion", "echo": payload, "query": {"i": str(i)}}
            # Request headers reach upstream; Host is the upstream's, not the proxy's.
            assert upstream.last_headers["X-Test"] == "abc"
            assert upstream.last_headers["Host"] == upstream.url.removeprefix("http://")

            r = c.get("/health")
            assert (r.status_code, r.text) == (200, "ok")
            r = c.get("/v1/models")
            assert r.json()["data"][0]["id"] == "fake-model"
            # Non-200 statuses and arbitrary bodies/methods are passed through unchanged.
            blob = bytes(range(256)) * 100
            r = c.put("/created", content=blob)
            assert r.status_code == 201 and r.content == blob
            r = c.get("/does/not/exist")
            assert r.status_code == 404 and r.json() == {"error": "nope"}
            # Compressed upstream bodies arrive decoded (Content-Encoding is dropped).
            r = c.get("/gzip")
            assert r.status_code == 200 and r.json() == {"compressed": True}
            assert "content-encoding" not in r.headers

        assert proxy.counts["forwarded"] == n + 5
        assert sum(proxy.counts.values()) == n + 5
        assert upstream.hits[CHAT] == n


def test_all_requests_fail_with_rate_one(upstream):
    """failure_rate=1: every POST fails; each fault kind shows up as its client-side symptom."""
    n = 30
    proxy = FaultProxy(upstream.url, failure_rate=1.0, delay_s=5.0, seed=1234)
    url = proxy.start()
    try:
        expected = _expected_faults(1234, 1.0, n)
        assert set(expected) == set(FAULT_KINDS)  # the seed exercises every kind

        def one(i: int) -> str:
            with httpx.Client(timeout=1.0) as c:
                return _classify(c, url + CHAT, {"i": i})

        t0 = time.monotonic()
        # Concurrent so the ~10 one-second client timeouts overlap.
        with ThreadPoolExecutor(max_workers=n) as pool:
            outcomes = list(pool.map(one, range(n)))
        assert time.monotonic() - t0 < 5.0

        symptom = {"error_500": "500", "reset": "connection_error", "delay": "timeout"}
        assert "ok" not in outcomes
        for kind in FAULT_KINDS:
            assert outcomes.count(symptom[kind]) == expected.count(kind) > 0, (kind, outcomes)
            assert proxy.counts[kind] == expected.count(kind)
        assert proxy.counts["forwarded"] == 0
        assert sum(proxy.counts.values()) == n

        # The proxy survives resets/abandoned delays; non-fail paths and GETs are still forwarded.
        with httpx.Client(base_url=url, timeout=5.0) as c:
            assert c.get("/health").text == "ok"
            assert c.get(CHAT).json() == {"method": "GET"}
        assert proxy.counts["forwarded"] == 2
    finally:
        t0 = time.monotonic()
        proxy.stop()
        assert time.monotonic() - t0 < 3.0
    # Delayed requests whose client gave up were never forwarded.
    assert upstream.hits.get(CHAT, 0) == 1  # only the GET above


def test_sequence_is_deterministic_per_seed(upstream):
    """Sequential requests see exactly the fault sequence drawn by random.Random(seed)."""
    n, seed, rate = 24, 7, 0.5
    expected = _expected_faults(seed, rate, n)
    symptom = {None: "ok", "error_500": "500", "reset": "connection_error", "delay": "ok"}
    # delay_s shorter than the client timeout: delayed requests are forwarded late but succeed.
    with FaultProxy(upstream.url, failure_rate=rate, delay_s=0.2, seed=seed) as proxy:
        with httpx.Client(timeout=3.0) as c:
            outcomes = []
            for i in range(n):
                t0 = time.monotonic()
                outcomes.append(_classify(c, proxy.url + "/v1/completions", {"i": i}))
                if expected[i] == "delay":
                    assert time.monotonic() - t0 >= 0.19
        assert outcomes == [symptom[k] for k in expected]
        assert proxy.counts["forwarded"] == expected.count(None)
        for kind in FAULT_KINDS:
            assert proxy.counts[kind] == expected.count(kind)
        assert sum(proxy.counts.values()) == n
    assert upstream.hits["/v1/completions"] == expected.count(None) + expected.count("delay")


def test_upstream_down_gives_502_and_server_survives():
    # Grab a free port and close it so nothing listens there.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with FaultProxy(f"http://127.0.0.1:{port}", failure_rate=0.0) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5.0) as c:
            for _ in range(3):
                r = c.post(CHAT, json={})
                assert r.status_code == 502
                assert r.json()["error"]["code"] == 502
        assert proxy.counts["upstream_error"] == 3
        assert sum(proxy.counts.values()) == 3


def test_stop_is_quick_with_requests_in_flight(upstream):
    seed = 3
    assert _expected_faults(seed, 1.0, 1) == ["delay"]  # the POST below is held for 30 s
    proxy = FaultProxy(upstream.url, failure_rate=1.0, delay_s=30.0, seed=seed)
    url = proxy.start()
    results: dict[str, object] = {}

    def slow_client(name: str, method: str, path: str) -> None:
        try:
            with httpx.Client(timeout=20.0) as c:
                results[name] = c.request(method, url + path, json={}).status_code
        except Exception as e:
            results[name] = e

    threads = [
        threading.Thread(target=slow_client, args=("post", "POST", CHAT)),
        threading.Thread(target=slow_client, args=("slow", "GET", "/slow")),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while sum(proxy.counts.values()) < 1 or upstream.hits.get("/slow", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 3.0
    proxy.stop()  # idempotent
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    # The long upstream call is abandoned: the client sees the connection go away.
    assert isinstance(results["slow"], httpx.TransportError), results
    # The delayed POST is dropped without being forwarded.
    assert isinstance(results["post"], httpx.TransportError), results
    assert upstream.hits.get(CHAT, 0) == 0
