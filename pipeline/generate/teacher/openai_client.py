"""Any OpenAI-compatible endpoint (vLLM, SGLang, a hosted API) through the `openai` async client.

The client's own retries are off (`max_retries=0`): its defaults (600 s timeout, 2 retries) re-send long
chain-of-thought requests that are still generating, so the teacher would work twice. Here one request per
problem is in flight at a time, its timeout follows from max_tokens, and retries use jittered backoff on
timeouts, resets, 408/429 (honouring Retry-After) and 5xx only. A 400 that says the prompt is over the context is
final for that problem (recorded as rejected_too_long); any other 4xx (a wrong served-model name, a bad key, a
setting the server refuses) would fail every request alike, so the run stops at the first one with the endpoint's
message. Several endpoints share the load (least requests in flight first); one that keeps failing is taken out
for a cool-down and probed again after it. Keys are read from the environment (see TeacherConfig.endpoint_keys) and
scrubbed from every error message kept.

Sparse KD (`sampling.teacher_topk: K`) asks for `top_logprobs` and vLLM's `return_tokens_as_token_ids` (extra body),
so that every token, sampled and top, comes back as "token_id:N", an id of the teacher's vocabulary, not a decoded
string that may not map back to one id. A server that ignores it (not vLLM) answers with plain token strings; the
run then stops with a TeacherConfigError at the first answer, rather than generating hours of rows without the
columns it was asked for. One that refuses the field (a 400) stops it the same way, with its own message. K + 1
top log-probs are asked (see `_request`): a `vllm serve` endpoint needs `--max-logprobs` of at least K + 1 (its
default, 20, allows K up to 19); the managed vllm-server backend is started with 21.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx
import openai

from pipeline.generate.completion import Completion, TopK, mean_topk_entropy
from pipeline.generate.config import NO_KEY, SamplingConfig, TeacherConfig
from pipeline.generate.teacher.base import Teacher, TeacherConfigError, TeacherRequest, TeacherResult

_RETRY_STATUS = {408, 409, 429}
# How servers say a prompt does not fit: vLLM ("This model's maximum context length is N tokens"; "exceeds model's
# maximum context length"), OpenAI (code context_length_exceeded), SGLang ("longer than the model's context length").
_CONTEXT_MARKERS = ("maximum context length", "context length", "context_length_exceeded")
_FAILURES_BEFORE_COOLDOWN = 2
_COOLDOWN_S = (5.0, 60.0)  # first and longest cool-down of an unhealthy endpoint
_BACKOFF_S = (0.5, 30.0)
_TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids format


@dataclass
class Endpoint:
    url: str
    client: openai.AsyncOpenAI
    in_flight: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


class OpenAITeacher(Teacher):
    engine = "openai"

    def __init__(self, cfg: TeacherConfig, served_model: str, engine: str | None = None, send_seed: bool = True):
        """`send_seed=False` for servers started with the seed as their engine seed (see SamplingConfig.seed)."""
        super().__init__()
        self._send_seed = send_seed
        self._cfg = cfg
        self._served_model = served_model
        self._keys = cfg.endpoint_keys()  # a named key variable that is unset fails here, before any request
        self._secrets = [key for _, key in self._keys if key != NO_KEY]
        if engine:
            self.engine = engine
        self.engine_version = _server_version(cfg.urls())

    def timeout_s(self, sampling: SamplingConfig) -> float:
        """From max_tokens at a floor of 1 token/s per sequence, as a full CPU batch is that slow."""
        return self._cfg.request_timeout_s or 60.0 + sampling.max_tokens

    def generate(self, requests: Iterable[TeacherRequest], sampling: SamplingConfig) -> Iterator[TeacherResult]:
        """Runs the asyncio client in a thread and hands its results over a queue, so callers stay synchronous.

        A request's slot (of `concurrency`) is handed back when the caller takes its result, not when the answer
        arrives: a caller slower than the endpoints (writing parts of a million problems) holds back the sending,
        so results never pile up in memory."""
        results: queue.Queue = queue.Queue()
        done = object()
        stop = threading.Event()
        client: dict = {}  # the client thread's loop, main task and slots

        def runner() -> None:
            try:
                asyncio.run(self._run(requests, sampling, results, stop, client))
            except BaseException as e:  # surfaced in the caller's thread below
                results.put(e)
            finally:
                results.put(done)

        thread = threading.Thread(target=runner, name="openai-teacher", daemon=True)
        thread.start()
        try:
            while (item := results.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                with contextlib.suppress(RuntimeError):  # the client has sent everything and closed its loop
                    client["loop"].call_soon_threadsafe(client["slots"].release)
                yield item
        finally:
            stop.set()
            if "loop" in client and thread.is_alive():
                # wake a client waiting for a slot: it stops sending, cancels what is in flight (RuntimeError:
                # its loop closed meanwhile)
                with contextlib.suppress(RuntimeError):
                    client["loop"].call_soon_threadsafe(client["task"].cancel)
            thread.join(timeout=10)

    async def _run(self, requests, sampling, results: queue.Queue, stop: threading.Event, client: dict) -> None:
        timeout = self.timeout_s(sampling)
        limits = httpx.Limits(max_connections=self._cfg.concurrency, max_keepalive_connections=self._cfg.concurrency)
        endpoints = [
            Endpoint(
                url,
                openai.AsyncOpenAI(
                    base_url=url,
                    api_key=key,
                    max_retries=0,
                    timeout=timeout,
                    http_client=httpx.AsyncClient(limits=limits, timeout=timeout),
                ),
            )
            for url, key in self._keys
        ]
        await asyncio.gather(*(self._probe(e, endpoints) for e in endpoints))
        slots = asyncio.Semaphore(self._cfg.concurrency)
        client.update(loop=asyncio.get_running_loop(), task=asyncio.current_task(), slots=slots)
        tasks: set[asyncio.Task] = set()
        # The first configuration error (or a bug) stops sending and is raised in the caller's thread.
        fatal: list[Exception] = []

        async def one(request: TeacherRequest) -> None:
            try:
                results.put(await self._request(request, sampling, endpoints))  # its slot: released by the caller
            except Exception as e:
                fatal.append(e)
                slots.release()

        try:
            for request in requests:
                await slots.acquire()
                if stop.is_set() or fatal:
                    break
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not fatal:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if fatal:
                raise fatal[0]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(e.client.close() for e in endpoints), return_exceptions=True)

    async def _probe(self, endpoint: Endpoint, endpoints: list[Endpoint]) -> None:
        """Take an endpoint that does not answer /models out of rotation before the first request."""
        try:
            await endpoint.client.models.list(timeout=10)
        except (openai.APIError, httpx.HTTPError):
            self.counters["endpoint_down_at_start"] += 1
            self._failed(endpoint, endpoints, force=True)

    def _failed(self, endpoint: Endpoint, endpoints: list[Endpoint], force: bool = False) -> None:
        """Cool an endpoint down only while another one is healthy: the last one left is retried with backoff."""
        endpoint.failures += 1
        now = time.monotonic()
        others_healthy = any(e is not endpoint and e.healthy(now) for e in endpoints)
        if force or (others_healthy and endpoint.failures >= _FAILURES_BEFORE_COOLDOWN):
            cooldown = min(_COOLDOWN_S[1], _COOLDOWN_S[0] * 2 ** max(0, endpoint.failures - _FAILURES_BEFORE_COOLDOWN))
            endpoint.down_until = now + cooldown
            self.counters["endpoint_cooldowns"] += 1

    async def _pick(self, endpoints: list[Endpoint]) -> Endpoint:
        now = time.monotonic()
        healthy = [e for e in endpoints if e.healthy(now)]
        if not healthy:  # all cooling down: wait for the first to come back, then probe it with a real request
            soonest = min(endpoints, key=lambda e: e.down_until)
            await asyncio.sleep(max(0.0, soonest.down_until - now))
            return soonest
        return min(healthy, key=lambda e: (e.in_flight, random.random()))

    async def _request(self, request: TeacherRequest, sampling: SamplingConfig, endpoints) -> TeacherResult:
        last_error = ""
        # vLLM's server lists the sampled token first, then the top ones, and cuts the list at top_logprobs: when the
        # sampled token is not among the top K, K asked would return it and only K - 1 of the top. K + 1 always holds
        # the true top K (TopK keeps the K best). The entropy keeps its own k of them.
        top = max(sampling.logprobs, sampling.teacher_topk + 1 if sampling.teacher_topk else 0)
        for attempt in range(self._cfg.max_retries + 1):
            endpoint = await self._pick(endpoints)
            endpoint.in_flight += 1
            retry_after = None
            sent = time.monotonic()
            try:
                response = await endpoint.client.chat.completions.create(
                    model=self._served_model,
                    messages=request.messages,
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    logprobs=bool(top),
                    top_logprobs=top or None,
                    seed=sampling.seed if self._send_seed else None,
                    extra_headers={"X-Request-Id": f"{request.key}-{attempt}"},
                    extra_body={"return_tokens_as_token_ids": True} if sampling.teacher_topk else None,
                )
                endpoint.failures = 0
                return _result(request.key, response, sampling, time.monotonic() - sent, endpoint.url)
            except openai.APITimeoutError as e:
                kind, last_error = "timeout", self._scrub(str(e))
            except openai.APIConnectionError as e:
                kind, last_error = "connection", self._scrub(str(e))
                self._failed(endpoint, endpoints)
            except openai.APIStatusError as e:
                message = e.message.removeprefix(f"Error code: {e.status_code} - ")  # the client's own prefix
                last_error = self._scrub(f"HTTP {e.status_code}: {message}")
                if e.status_code not in _RETRY_STATUS and e.status_code < 500:
                    if _too_long(e):
                        self.counters["rejected_too_long"] += 1
                        return TeacherResult(request.key, error_kind="rejected_too_long", error=last_error)
                    self.counters["config_error"] += 1
                    raise TeacherConfigError(
                        f"teacher endpoint {endpoint.url} refused problem {request.key} with {last_error}. Every "
                        f"request would fail alike, so the run stops: check teacher.model (sent as model "
                        f"{self._served_model!r}), teacher.endpoints, the API key (teacher.api_key_env, default "
                        f"OPENAI_API_KEY) and the sampling settings the server accepts"
                    ) from None
                kind = f"http_{e.status_code}"
                retry_after = _retry_after(e.response)
                if e.status_code >= 500:
                    self._failed(endpoint, endpoints)
            finally:
                endpoint.in_flight -= 1
            self.counters[f"retry_{kind}"] += 1
            self.counters["retries"] += 1
            if attempt < self._cfg.max_retries:
                backoff = min(_BACKOFF_S[1], _BACKOFF_S[0] * 2**attempt) * random.uniform(0.5, 1.5)
                await asyncio.sleep(retry_after if retry_after is not None else backoff)
        self.counters["infra_errors"] += 1
        return TeacherResult(request.key, error_kind="infra_error", error=f"gave up after retries: {last_error}")

    def _scrub(self, message: str) -> str:
        """Some servers echo the key they refused (a 401 body): it must not reach stats.json or the terminal."""
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


def _too_long(error: openai.APIStatusError) -> bool:
    text = f"{error.message} {error.code or ''}".lower()
    return error.status_code == 400 and any(marker in text for marker in _CONTEXT_MARKERS)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(120.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _token_id(token: str, where: str) -> int:
    if not token.startswith(_TOKEN_ID_PREFIX):
        raise TeacherConfigError(
            f"{where}: sampling.teacher_topk needs token ids, and the endpoint answered the token {token!r} "
            f"instead of '{_TOKEN_ID_PREFIX}N': it does not support vLLM's return_tokens_as_token_ids (serve the "
            f"teacher with vLLM, or set sampling.teacher_topk=0)"
        )
    return int(token.removeprefix(_TOKEN_ID_PREFIX))


def _topk(tokens, k: int, where: str) -> TopK:
    """The sampled ids from each content entry, the top ones from its top_logprobs (as "token_id:N" strings)."""
    ids = [_token_id(t.token, where) for t in (tokens or ())]
    positions = ([(_token_id(a.token, where), a.logprob) for a in t.top_logprobs] for t in (tokens or ()))
    return TopK.from_positions(k, ids, positions, where)


def _result(key: str, response, sampling: SamplingConfig, latency_s: float, url: str = "") -> TeacherResult:
    completions = []
    for sample_index, choice in enumerate(sorted(response.choices, key=lambda c: c.index)):
        tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else None
        entropy = None
        if tokens and sampling.logprobs:
            entropy = mean_topk_entropy(([t.logprob for t in tok.top_logprobs] for tok in tokens), sampling.logprobs)
        topk = None
        if sampling.teacher_topk:
            where = f"teacher endpoint {url} problem {key} sample {sample_index}"
            if not tokens and (choice.message.content or choice.finish_reason == "length"):
                raise TeacherConfigError(f"{where}: sampling.teacher_topk asked for logprobs; the endpoint sent none")
            topk = _topk(tokens, sampling.teacher_topk, where)
        extra = choice.message.model_extra or {}
        completions.append(
            Completion(
                sample_index=sample_index,
                text=choice.message.content or "",
                finish_reason=choice.finish_reason or "unknown",
                completion_tokens=len(tokens) if tokens else _untracked_tokens(response, sampling),
                mean_token_entropy=entropy,
                reasoning_field=extra.get("reasoning_content") or extra.get("reasoning"),
                topk=topk,
            )
        )
    return TeacherResult(key, completions, response.usage.prompt_tokens if response.usage else None, latency_s)


def _untracked_tokens(response, sampling: SamplingConfig) -> int | None:
    """Without logprobs a server reports only the total over all n choices: exact for n == 1, unknown otherwise."""
    return response.usage.completion_tokens if response.usage and sampling.n == 1 else None


def _server_version(endpoints: list[str]) -> str:
    """vLLM answers GET /version; other servers may not, which is recorded as unknown."""
    for url in endpoints:
        root = url.rstrip("/").removesuffix("/v1")
        try:
            response = httpx.get(f"{root}/version", timeout=5)
            if response.status_code == 200:
                return f"vllm=={response.json().get('version', 'unknown')}"
        except (httpx.HTTPError, ValueError):
            continue
    return "unknown"
