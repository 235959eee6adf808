"""Runs a test suite against a candidate that lives in another process, so that only the tests decide.

The sandbox launcher executes this module's source (standard library only) and calls `main`. It forks: the child
becomes the candidate (its program runs, then it answers calls), the parent stays the checker (it reads the tests
only after the fork, so they are never in the candidate's memory, runs `check(candidate)` and writes the report).
`candidate` in the tests is a proxy: each call sends its arguments down a pipe and rebuilds the answer from plain
data, so what the tests compare is always a builtin value built here, never an object of the candidate's. An
exception in the candidate comes back as its type name and message. Whatever the candidate does to its own process
(patched builtins, hooks, threads, tracers, exits) stays there; the checker is not dumpable, so the candidate cannot
read its memory or open its pipes through /proc, and the report pipe is closed in the candidate before its program
starts. A candidate can kill the checker or stall it, which only ever makes it fail.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import linecache
import numbers
import os
import signal
import sys
import traceback

MAX_MESSAGE_BYTES = 16 * 2**20  # one call's answer; more is an output overrun
_PR_SET_DUMPABLE = 4
_SMALL_INT = 2**63
_MESSAGE_CHARS = 1000


class CandidateError(Exception):
    """An exception the candidate raised that has no builtin counterpart here: tests may catch it like any other."""


class CandidateGone(BaseException):  # not an Exception, so that no `except Exception` in a test hides it
    """The candidate's process ended, stalled the channel or broke the protocol: the suite cannot go on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(value):
    """A JSON-able form that keeps the builtin type (tuple vs list, int vs float, set, dict with any keys).

    Used on both sides; on the candidate's side it may convert the candidate's int, float or container subclasses
    (numpy scalars, named tuples) to the builtin they extend, and the checker's decoder accepts builtins alone.
    """
    kind = type(value)
    if value is None or kind in (bool, str):
        return value
    if kind is int:
        return value if -_SMALL_INT < value < _SMALL_INT else {"I": hex(value)}
    if kind is float:
        return value
    if kind is list:
        return {"l": [encode(item) for item in value]}
    if kind is tuple:
        return {"t": [encode(item) for item in value]}
    if kind is dict:
        return {"d": [[encode(key), encode(item)] for key, item in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "f": [encode(item) for item in value]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    return encode(_builtin(value))


def _builtin(value):
    for base in (bool, int, float, str, bytes, list, tuple, dict, frozenset, set, complex):
        if isinstance(value, base):
            return base(value)
    for abstract, base in ((numbers.Integral, int), (numbers.Real, float), (numbers.Complex, complex)):
        if isinstance(value, abstract):
            return base(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be passed between the tests and the candidate")


_CONTAINERS = {"l": list, "t": tuple, "s": set, "f": frozenset}


def decode(data):
    """Rebuild a value from `encode`'s form; anything else is a protocol error (ValueError or TypeError)."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is not dict or len(data) != 1:
        raise ValueError(f"not an encoded value: {type(data).__name__}")
    [(tag, payload)] = data.items()
    if tag in _CONTAINERS and type(payload) is list:
        return _CONTAINERS[tag](decode(item) for item in payload)
    if tag == "d" and type(payload) is list:
        return {decode(key): decode(item) for key, item in payload}
    if tag == "I" and type(payload) is str:
        return int(payload, 16)
    if tag == "b" and type(payload) is str:
        return bytes.fromhex(payload)
    if tag == "c" and type(payload) is list and len(payload) == 2 and all(type(p) is float for p in payload):
        return complex(*payload)
    raise ValueError(f"not an encoded value: tag {tag!r}")


def _serve(program: str, entry_point: str, calls, answers) -> None:
    """The candidate: run its program as __main__, then answer each call until the checker closes the pipe."""
    import runpy

    sys.argv = [program]
    namespace = runpy.run_path(program, run_name="__main__")
    function = namespace.get(entry_point)
    for line in calls:
        try:
            if function is None:
                raise NameError(f"name {entry_point!r} is not defined")
            args, kwargs = decode(json.loads(line))
            answer = {"ok": encode(function(*args, **kwargs))}
        except BaseException as exc:  # SystemExit too: an exit inside a call is the call's failure
            answer = {"error": [type(exc).__name__, str(exc)[:_MESSAGE_CHARS]]}
        answers.write(json.dumps(answer).encode() + b"\n")
        answers.flush()


class _Channel:
    """The checker's end: `call` is what the tests know as `candidate`."""

    def __init__(self, pid: int, calls: int, answers: int) -> None:
        self.pid = pid
        self.calls = os.fdopen(calls, "wb")
        self.answers = os.fdopen(answers, "rb")
        self.ended: CandidateGone | None = None

    def call(self, *args, **kwargs):
        if self.ended is not None:  # a test that caught the end of the candidate and called again
            raise self.ended
        request = encode([list(args), kwargs])
        try:
            self.calls.write(json.dumps(request).encode() + b"\n")
            self.calls.flush()
        except BrokenPipeError:
            raise self.gone() from None
        line = self.answers.readline(MAX_MESSAGE_BYTES + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_MESSAGE_BYTES:
                self.ended = CandidateGone("output_limit", "the candidate's answer is too large")
                raise self.ended
            raise self.gone()
        try:
            answer = json.loads(line)
            if type(answer) is not dict or len(answer) != 1:
                raise ValueError("not an answer")
            if "ok" in answer:
                return decode(answer["ok"])
            name, message = answer["error"]
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            self.ended = CandidateGone("runtime_error", f"the candidate broke the call protocol: {exc!r}")
            raise self.ended from None
        raise _rebuilt_exception(str(name), str(message))

    def gone(self) -> CandidateGone:
        """Why the candidate stopped answering, from its exit status (this process is its parent). A candidate that
        closed its end but lives on is killed; one already dead keeps the status it died with."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
            self.ended = CandidateGone("timeout", "the candidate ran out of CPU time")
        else:
            code = os.waitstatus_to_exitcode(status)
            self.ended = CandidateGone("runtime_error", f"the candidate's process ended (exit status {code})")
        return self.ended


def _rebuilt_exception(name: str, message: str) -> Exception:
    """A builtin exception of the same name where there is one (tests may expect ValueError), else CandidateError."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except TypeError:  # e.g. UnicodeDecodeError takes five arguments
            pass
    return CandidateError(f"{name}: {message}")


def _compiled(source: str, name: str):
    linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)  # tracebacks show the line
    return compile(source, name, "exec")


def _check(suite_fd: int, channel: _Channel) -> dict:
    with os.fdopen(suite_fd, "rb") as handle:
        suite = json.loads(handle.read())
    namespace = {"__name__": "__main__"}
    try:
        if suite["prompt"]:  # helpers the tests use (HumanEval/32's `poly`) come from the reference, not the candidate
            exec(_compiled(suite["prompt"], "<prompt>"), namespace)
        namespace[suite["entry_point"]] = channel.call
        exec(_compiled(suite["tests"], "<tests>"), namespace)
        namespace["check"](channel.call)
    except CandidateGone as exc:
        return {"passed": False, "reason": exc.reason, "error": str(exc)}
    except BaseException as exc:  # whatever stopped the tests, they did not pass
        reason = "wrong_answer" if type(exc) is AssertionError else "runtime_error"
        reason = "memory" if isinstance(exc, MemoryError) else reason
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return {"passed": False, "reason": reason, "error": "".join(lines)[-2000:]}
    return {"passed": True}


def main(cfg: dict, enter_candidate) -> None:
    """Never returns. cfg: the launcher's settings; enter_candidate() runs in the child before its program. A failure
    before the fork leaves the start marker unwritten, so that it counts as the sandbox's fault, not the answer's."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    suite_fd, report_fd = cfg["suite"]["fd"], cfg["marker_fd"]
    calls_read, calls_write = os.pipe()
    answers_read, answers_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (suite_fd, report_fd, calls_write, answers_read):
            os.close(fd)
        try:
            enter_candidate()
            calls, answers = os.fdopen(calls_read, "rb"), os.fdopen(answers_write, "wb")
            _serve(cfg["program"], cfg["suite"]["entry_point"], calls, answers)
        except BaseException:  # reported on the candidate's stderr; the checker sees the pipe close
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):  # the candidate may have replaced or closed its streams
                    stream.flush()
            os._exit(1)
    for fd in (calls_read, answers_write):
        os.close(fd)
    os.write(report_fd, b"ok")  # the sandbox's start marker: what fails from here on is the candidate's doing
    report = _check(suite_fd, _Channel(pid, calls_write, answers_read))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)
    os._exit(0)
