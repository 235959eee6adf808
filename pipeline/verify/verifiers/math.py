"""Math answers judged by math-verify in a pool of worker processes with a hard per-sample deadline.

math-verify is run only in workers because it cannot be trusted in the calling process: its own timeout uses
SIGALRM (which fails off the main thread and cancels the caller's alarm, and whose TimeoutException is a
BaseException), and some parsed values hang forever when turned into strings (Math-Verify issue #65). So workers
parse and compare with math-verify's timeouts off, send back only strings, and the parent enforces `timeout_s` by
SIGKILLing a worker that overruns and starting a new one. An overrun is the answer's fault (FAILED "timeout"); a
worker that dies on its own is ours (INFRA_ERROR "worker_crashed") and the row is verified again on the next run; a
gold answer math-verify cannot parse is the data's (DATA_FAULT "bad_reference"): final, whatever the answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection, wait

from pipeline.records import DATA_FAULT, FAILED, INFRA_ERROR, PASSED
from pipeline.verify.config import MathConfig
from pipeline.verify.verifiers.base import Verdict, Verifier, VerifyItem, load_reference

MAX_DETAIL_CHARS = 500
PIPELINE_DEPTH = 2  # items sent to a worker ahead of its answers
QUEUED_MAX_CHARS = 8192  # larger items wait until their worker is idle (see MathVerifier._feed)
GOLD_CACHE = 65536  # golds remembered as readable or not, so that a sample without an answer needs no worker
STARTUP_TIMEOUT_S = 120.0  # a worker imports sympy before it is ready; only a broken environment takes this long
_READY = "ready"
_PR_SET_PDEATHSIG = 1

# Every pattern here runs in the parent on untrusted text, so none may backtrack: no two adjacent parts that can
# match the same characters, and nothing that crosses a line.
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)[ \t]*\{|\\\\|\\[{}]|[{}]")
_FINAL_LINE = re.compile(
    r"(?:final[ \t]+answer(?:[ \t]+is)?|the[ \t]+answer[ \t]+is|^[ \t>#*_]*answer)[ \t*_:\uff1a]*(?P<ans>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))
_SCIENTIFIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)[eE][+-]?\d+")
_THIN_SPACE_GROUP = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_DECIMALS = re.compile(r"\d\.(\d+)")


def extract_answer(text: str) -> str | None:
    """The last closed \\boxed{} (or \\fbox{}), else the last final-answer line, else None.

    One pass with a brace stack keeps this linear: it runs in the parent, on answers that can be adversarial."""
    stack: list[int | None] = []  # content start for a box opener, None for a plain brace
    last: tuple[int, int] | None = None
    for m in _BOX_TOKENS.finditer(text):
        token = m.group()
        if token[0] == "\\" and len(token) == 2:
            continue  # a line break, or a literal brace of a set: neither nests
        if token != "}":
            stack.append(None if token == "{" else m.end())
        elif stack and (start := stack.pop()) is not None:
            last = (start, m.start())  # closes after every earlier box: the outer one of nested boxes wins
    if last is not None and (boxed := text[last[0] : last[1]].strip()):
        return boxed
    lines = [a for m in _FINAL_LINE.finditer(text) if (a := m.group("ans").strip())]
    if not lines:
        return None
    answer = re.split(r"\.(?:\s|$)", lines[-1], maxsplit=1)[0]  # "The answer is 7.5. Done" -> 7.5
    return _strip_delimiters(answer) or None


def _strip_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in _DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
    return text


def _normalize(text: str) -> str:
    """Spellings that math-verify misreads: 1e3 is read as 1*e*3 and 1\\,000 as 1*0."""
    text = _strip_delimiters(text)
    if _SCIENTIFIC.fullmatch(text):
        try:
            value = Decimal(text)
            if abs(value.adjusted()) <= 60:  # an enormous exponent would become an enormous digit string
                return format(value, "f")
            return f"{format(value.scaleb(-value.adjusted()), 'f')}\\times 10^{{{value.adjusted()}}}"
        except InvalidOperation:
            pass
    return _THIN_SPACE_GROUP.sub("", text)


def reference_text(reference: str) -> str:
    """The gold answer as text; numbers keep their original spelling ("[1,2]" is an interval, not a JSON list)."""
    value = load_reference(reference)
    if isinstance(value, dict) and isinstance(value.get("answer"), (str, int, float)):
        value = str(value["answer"])
    text = value if isinstance(value, str) else reference
    if "\\boxed" in text or "\\fbox" in text:  # a worked solution rather than a bare answer
        return extract_answer(text) or text
    return text


def _float_rounding(gold: str) -> int:
    """math-verify rounds floats to 6 places; a gold written with more places asks for them (1.49493029151)."""
    places = max((len(m.group(1)) for m in _DECIMALS.finditer(_normalize(gold))), default=0)
    return min(15, max(6, places))


def judge(gold: str, answer: str | None) -> tuple[str, str]:
    """Compare in the calling process with no timeout: only for workers (and benchmarks of them).

    The gold is read first, so that a reference no one can read is a data fault even when there is no answer."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{_normalize(gold)}}}", parsing_timeout=None)
    if not gold_parsed:
        return DATA_FAULT, "bad_reference"
    if answer is None:
        return FAILED, "no_answer"
    answer_parsed = parse(f"\\boxed{{{_normalize(answer)}}}", parsing_timeout=None)
    if verify(gold_parsed, answer_parsed, float_rounding=_float_rounding(gold), timeout_seconds=None):
        return PASSED, "correct"
    return FAILED, "wrong_answer"


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _serve(conn: Connection, parent_pid: int, kernel_signal: bool) -> None:
    """One (gold, answer) in, one (status, reason) out. A worker must not outlive a parent killed with -9: the
    kernel's parent-death signal reaches it even inside a long C call, but fires when the *thread* that started it
    ends, so it is only used when that was the main thread; polling the parent pid covers the rest."""
    if kernel_signal and sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": the parent enforces it
    judge("1", "1")  # import and warm sympy's parser now, so that it is not billed to the first item's deadline
    conn.send(_READY)
    while (job := conn.recv()) is not None:
        try:
            conn.send(judge(*job))
        except Exception:  # math-verify swallows its own errors; anything here is a broken worker
            logging.getLogger(__name__).exception("math worker failed")
            conn.send((INFRA_ERROR, "worker_crashed"))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        main = threading.current_thread() is threading.main_thread()
        self.process = ctx.Process(target=_serve, args=(child, os.getpid(), main), daemon=True, name="math-verifier")
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.inflight: deque[int] = deque()  # sent, answered in order; only the first is being judged
        self.deadline = 0.0  # for inflight[0]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: a worker stuck in sympy never returns to read a polite request
        self.process.join(timeout=5)
        self.conn.close()


def _stop(workers: list[_Worker]) -> None:
    """Idle workers are asked to exit and given a moment; the rest (starting or stuck) are killed at once."""
    asked = []
    for w in workers:
        if w.ready and not w.inflight:
            with contextlib.suppress(OSError):
                w.conn.send(None)
                asked.append(w)
    deadline = time.monotonic() + 2
    for w in asked:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        w.kill()
    workers.clear()


class MathVerifier(Verifier):
    """Processes start on first use and are reused across batches; close() (or garbage collection) stops them."""

    name = "math"

    def __init__(self, cfg: MathConfig) -> None:
        self.cfg = cfg
        self._ctx = multiprocessing.get_context("spawn")  # the parent may hold threads: fork is unsafe
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._gold_readable: OrderedDict[str, bool] = OrderedDict()  # gold text -> math-verify could parse it
        self._finalizer = weakref.finalize(self, _stop, self._workers)

    def close(self) -> None:
        with self._lock:
            _stop(self._workers)

    def verify_batch(self, items: list[VerifyItem]) -> list[Verdict]:
        golds = [reference_text(item.reference) for item in items]
        # Only the answer part counts: a \\boxed{} inside the thinking is a draft, not the model's conclusion.
        answers = [extract_answer(item.answer) for item in items]
        jobs = {i: (golds[i], answer) for i, answer in enumerate(answers) if answer is not None}
        # A sample without an answer is still a data fault when its gold cannot be read: a gold neither judged
        # before nor judged with an answer in this batch gets one gold-only job.
        judged = {gold for gold, _ in jobs.values()} | set(self._gold_readable)
        unseen = sorted({g for g, a in zip(golds, answers, strict=True) if a is None and g not in judged})
        jobs |= {len(items) + k: (gold, None) for k, gold in enumerate(unseen)}
        results: dict[int, tuple[str, str]] = {}
        if jobs:
            with self._lock:
                results = self._run(jobs)
        for i, (gold, _) in jobs.items():
            status, reason = results[i]
            if status != INFRA_ERROR and reason != "timeout":  # a gold that was read (or not) to the end
                self._gold_readable[gold] = status != DATA_FAULT
                self._gold_readable.move_to_end(gold)
        while len(self._gold_readable) > GOLD_CACHE:
            self._gold_readable.popitem(last=False)
        gold_only = {jobs[i][0]: results[i] for i in range(len(items), len(items) + len(unseen))}
        verdicts = []
        for i, answer in enumerate(answers):
            if answer is not None:
                status, reason = results[i]
            elif golds[i] in gold_only:
                status, reason = gold_only[golds[i]]
            else:
                unreadable = self._gold_readable.get(golds[i]) is False
                status, reason = (DATA_FAULT, "bad_reference") if unreadable else (FAILED, "no_answer")
            verdicts.append(Verdict(status, reason, {"extracted": answer and answer[:MAX_DETAIL_CHARS]}))
        return verdicts

    def _run(self, jobs: dict[int, tuple[str, str | None]]) -> dict[int, tuple[str, str]]:
        """Keep every worker fed; kill and replace any worker whose current item is past its deadline."""
        while len(self._workers) < self.cfg.workers:
            self._workers.append(_Worker(self._ctx))
        pending: deque[int] = deque(jobs)
        results: dict[int, tuple[str, str]] = {}
        failed_starts = 0
        while pending or any(w.inflight for w in self._workers):
            for w in list(self._workers):
                self._feed(w, jobs, pending, results)
            busy = [w for w in self._workers if w.inflight or not w.ready]
            due = min(w.deadline if w.ready else w.started + STARTUP_TIMEOUT_S for w in busy)
            for conn in wait([w.conn for w in busy], timeout=max(0.0, due - time.monotonic())):
                w = next(w for w in busy if w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    failed_starts += not w.ready
                    self._retire(w, (INFRA_ERROR, "worker_crashed"), pending, results)
                    continue
                if message == _READY:
                    w.ready, failed_starts = True, 0
                else:
                    results[w.inflight.popleft()] = message
                    w.deadline = time.monotonic() + self.cfg.timeout_s  # the next queued item starts now
            now = time.monotonic()
            for w in list(self._workers):
                if w.inflight and now >= w.deadline:
                    self._retire(w, (FAILED, "timeout"), pending, results)
                elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                    failed_starts += 1
                    self._retire(w, (INFRA_ERROR, "worker_crashed"), pending, results)
            if failed_starts > 3 * self.cfg.workers:  # the environment is broken, not one answer
                results.update({i: (INFRA_ERROR, "worker_crashed") for i in pending})
                pending.clear()
        return results

    def _feed(self, w: _Worker, jobs, pending: deque[int], results) -> None:
        """Queue an item behind the current one so that a worker never waits for us; only a small one, since a large
        one could fill the pipe of a stuck worker and block us past every deadline."""
        while w.ready and pending and len(w.inflight) < PIPELINE_DEPTH:
            job = jobs[pending[0]]
            if w.inflight and len(job[0]) + len(job[1] or "") > QUEUED_MAX_CHARS:
                return
            try:
                w.conn.send(job)
            except OSError:  # it died (e.g. the OOM killer); the unsent item stays pending
                self._retire(w, (INFRA_ERROR, "worker_crashed"), pending, results)
                return
            if not w.inflight:
                w.deadline = time.monotonic() + self.cfg.timeout_s
            w.inflight.append(pending.popleft())

    def _retire(self, w: _Worker, verdict: tuple[str, str], pending: deque[int], results) -> None:
        """The item being judged gets `verdict`; items queued behind it never started and go back to the queue."""
        if w.inflight:
            results[w.inflight.popleft()] = verdict
        pending.extendleft(reversed(w.inflight))
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx)
