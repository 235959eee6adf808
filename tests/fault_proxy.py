"""Local fault-injecting HTTP reverse proxy for tests.

``FaultProxy`` sits in front of a real OpenAI-compatible server (e.g. vLLM) on
127.0.0.1 and makes a seeded fraction of POST requests to the generation
endpoints fail in one of three ways:

* ``"error_500"``: answer 500 with a JSON error body, upstream is not contacted;
* ``"reset"``: abort the TCP connection (RST) without sending any response;
* ``"delay"``: wait ``delay_s`` seconds before forwarding (the client is
  expected to time out first; if it disconnected, nothing is forwarded).

Everything else (other paths such as ``/health`` or ``/v1/models``, other
methods, and the non-failing fraction) is forwarded unchanged. Only
non-streaming responses are supported: the upstream body is read in full and
returned in one piece.

The proxy runs an aiohttp server on its own asyncio loop in a daemon thread::

    with FaultProxy("http://127.0.0.1:8123", failure_rate=0.3, delay_s=10, seed=1) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1", ...)
        ...
    print(proxy.counts)   # {"forwarded": ..., "error_500": ..., "reset": ..., "delay": ..., "upstream_error": ...}

Only loopback addresses are used: the proxy binds 127.0.0.1 and refuses an
upstream that is not on a loopback host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import threading
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

__all__ = ["FAULT_KINDS", "FaultProxy"]

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("error_500", "reset", "delay")

# RFC 7230 section 6.1 hop-by-hop headers, plus the ones the proxy must recompute.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_DROP_REQUEST_HEADERS = _HOP_BY_HOP | {"host", "content-length"}
# aiohttp decompresses upstream bodies, so Content-Encoding must go too.
_DROP_RESPONSE_HEADERS = _HOP_BY_HOP | {"content-encoding", "content-length", "transfer-encoding"}

_POLL_S = 0.05  # granularity of the delay loop (disconnect / stop checks)


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _filter_headers(headers, drop: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    # Also honour headers named in the "Connection" header (they are hop-by-hop too).
    extra = set()
    for value in headers.getall("Connection", []):
        extra.update(tok.strip().lower() for tok in value.split(",") if tok.strip())
    return [(k, v) for k, v in headers.items() if k.lower() not in drop and k.lower() not in extra]


class FaultProxy:
    """Forwards HTTP requests to `upstream` (e.g. "http://127.0.0.1:8123"); a seeded fraction of POST requests fail.

    Args:
        upstream: base URL of the real server, loopback only (``http://127.0.0.1:PORT``).
        failure_rate: probability that a POST to one of ``fail_paths`` gets a fault.
        delay_s: how long the "delay" fault waits before forwarding.
        seed: seed of the ``random.Random`` that draws faults (deterministic per request order).
        fail_paths: request paths (exact match, no query) eligible for faults.

    Attributes:
        url: base URL of the proxy once started (``"http://127.0.0.1:PORT"``), else None.
        counts: requests handled so far, by outcome: "forwarded", "error_500", "reset",
            "delay" (counted once, whether or not it is forwarded afterwards) and
            "upstream_error" (forwarding failed, the client got a 502). Every request
            handled increments exactly one key.
    """

    def __init__(
        self,
        upstream: str,
        failure_rate: float = 0.2,
        delay_s: float = 30.0,
        seed: int = 0,
        fail_paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions"),
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not _is_loopback_host(parts.hostname):
            raise ValueError(f"upstream must be an http:// loopback URL, got {upstream!r}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.upstream = upstream.rstrip("/")
        self.failure_rate = float(failure_rate)
        self.delay_s = float(delay_s)
        self.seed = seed
        self.fail_paths = tuple(fail_paths)
        self.counts: dict[str, int] = {"forwarded": 0, "error_500": 0, "reset": 0, "delay": 0, "upstream_error": 0}
        self.url: str | None = None

        self._rng = random.Random(seed)
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._stopped: asyncio.Event | None = None  # set (in the loop) when stop() is called

    # ------------------------------------------------------------------ public API

    def start(self) -> str:
        """Start serving on 127.0.0.1 (ephemeral port) in a background thread; return the base URL."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready = threading.Event()
        box: dict[str, object] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._thread_main, args=(ready, box), name="FaultProxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("FaultProxy did not start within 30 s")
        if "error" in box:
            self._thread.join(timeout=5)
            self._thread = None
            raise RuntimeError("FaultProxy failed to start") from box["error"]  # type: ignore[arg-type]
        self.url = f"http://127.0.0.1:{box['port']}"
        return self.url

    def stop(self) -> None:
        """Stop the server, abandon in-flight delays and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        self._stopping = True
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._signal_stop)
                pass
        thread.join(timeout=10)
        if thread.is_alive():  # pragma: no cover - should not happen
            log.warning("FaultProxy thread did not exit within 10 s")
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"FaultProxy(upstream={self.upstream!r}, url={self.url!r}, failure_rate={self.failure_rate}, "
            f"delay_s={self.delay_s}, seed={self.seed}, counts={self.counts})"
        )

    # ------------------------------------------------------------------ thread / loop

    def _signal_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _thread_main(self, ready: threading.Event, box: dict) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(ready, box))
        except BaseException as e:
            if not ready.is_set():
                box["error"] = e
                ready.set()
            else:
                log.exception("FaultProxy loop crashed")
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _serve(self, ready: threading.Event, box: dict) -> None:
        self._stopped = asyncio.Event()
        if self._stopping:  # stop() raced with start()
            self._stopped.set()
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=True,
        )
        try:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
            box["port"] = sockets[0].getsockname()[1]
            ready.set()
            await self._stopped.wait()
        finally:
            try:
                await self._runner.cleanup()
            finally:
                await self._session.close()

    # ------------------------------------------------------------------ request handling

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def _draw_fault(self, request: web.Request) -> str | None:
        if request.method != "POST" or request.path not in self.fail_paths:
            return None
        # Handlers all run on the proxy's single loop thread, so the RNG is not shared across threads.
        if self._rng.random() < self.failure_rate:
            return self._rng.choice(FAULT_KINDS)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        counted = False
        try:
            fault = self._draw_fault(request)
            if fault is not None:
                self._count(fault)
                counted = True
            if fault == "error_500":
                return web.json_response(
                    {
                        "error": {
                            "message": "FaultProxy injected internal server error",
                            "type": "InternalServerError",
                            "code": 500,
                        }
                    },
                    status=500,
                )
            if fault == "reset":
                self._reset(request)
                return _DROPPED()
            if fault == "delay" and not await self._delay(request):
                # Client gone (or proxy stopping): forward nothing, send nothing.
                self._reset(request)
                return _DROPPED()
            ok, resp = await self._forward(request)
            if not counted:
                self._count("forwarded" if ok else "upstream_error")
                counted = True
            return resp
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("FaultProxy: error handling %s %s", request.method, request.path_qs)
            if not counted:
                self._count("upstream_error")
            return self._bad_gateway(e)

    @staticmethod
    def _reset(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # SO_LINGER with timeout 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _delay(self, request: web.Request) -> bool:
        """Sleep delay_s in small steps; False if the client disconnected or the proxy is stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delay_s
        while True:
            if self._stopping:
                return False
            transport = request.transport
            if transport is None or transport.is_closing():
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(_POLL_S, remaining))

    async def _forward(self, request: web.Request) -> tuple[bool, web.StreamResponse]:
        """Forward to upstream; (True, response) or (False, 502 response) if upstream failed."""
        assert self._session is not None
        body = await request.read()
        headers = _filter_headers(request.headers, _DROP_REQUEST_HEADERS)
        url = self.upstream + request.rel_url.raw_path_qs
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            ) as resp:
                payload = await resp.read()
                out_headers = _filter_headers(resp.headers, _DROP_RESPONSE_HEADERS)
                status, reason = resp.status, resp.reason
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("FaultProxy: upstream error for %s %s: %r", request.method, request.path_qs, e)
            return False, self._bad_gateway(e)
        return True, web.Response(status=status, reason=reason, headers=CIMultiDict(out_headers), body=payload)

    @staticmethod
    def _bad_gateway(e: BaseException) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": f"FaultProxy upstream error: {type(e).__name__}: {e}",
                    "type": "BadGateway",
                    "code": 502,
                }
            },
            status=502,
        )


def _DROPPED() -> web.Response:
    """Placeholder returned after the connection was aborted.

    aiohttp fails to write it to the closed transport (a ConnectionError it handles
    quietly as a premature client disconnect), so the client receives nothing.
    """
    return web.Response(status=599, text="connection dropped by FaultProxy")
