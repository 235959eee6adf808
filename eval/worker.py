"""A call run in a fresh process of its own: each model of `distill eval` gets one, so its memory goes when it ends.

vLLM does not give GPU memory back when an engine is dropped inside a process (its CUDA context, the allocator's
cache and the distributed groups live as long as the process), so a second model evaluated in the same process
would start on a GPU still holding the first one's weights and KV cache. The process is started by
multiprocessing's "spawn" method, never fork: a forked child inherits the parent's threads and any CUDA or vLLM
state, which neither supports. Arguments go in and the result comes back pickled through a pipe; an exception in
the child is raised again in the parent, with the child's traceback as a note, so the error stays visible.

The parent must never leave a child running: on Ctrl-C, SIGTERM (raised as KeyboardInterrupt by the `distill`
command) or any other exception, it sends the child SIGTERM, which the child turns into one KeyboardInterrupt (its
generate stage then closes its parts, as it would in the foreground), waits for it, and kills it with its own
children if it has not ended within `grace_s`.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

GRACE_S = 60.0  # an interrupted generate stage flushes its parts and shuts its engine down well within this


@dataclass(frozen=True)
class WorkerExit:
    """Which process ran the call, how it ended, and its wall time (start-up included)."""

    pid: int
    exitcode: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WorkerDied(RuntimeError):
    """The child ended without a result: killed (out of memory, a signal) or crashed in native code."""


def _interrupt_once(signum, frame) -> None:
    """A second signal (a terminal's SIGINT reaches the whole group, then the parent's SIGTERM) must not interrupt
    the cleanup the first one started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text (a class defined in a
    library the parent never imported, or one holding an open file)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _child(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:  # KeyboardInterrupt too: the parent re-raises it and decides
        conn.send(("error", _portable(error), traceback.format_exc()))
    else:
        conn.send(("ok", result, None))
    finally:
        conn.close()


def _stop(process, grace_s: float) -> None:
    """SIGTERM, a grace period, then SIGKILL for the child and whatever it started."""
    if not process.is_alive():
        process.join()
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    process.terminate()
    process.join(grace_s)
    if process.is_alive():
        process.kill()
    for leftover in descendants:  # psutil checks each one's start time: a reused pid is never signalled
        try:
            leftover.kill()
        except psutil.Error:  # already gone: the usual case
            continue
    process.join()


def run_in_process(fn: Callable, *args, grace_s: float = GRACE_S, name: str | None = None, **kwargs):
    """`fn(*args, **kwargs)` in a spawned process; returns (its result, WorkerExit). `fn` must be importable by
    name (a module-level function) and its arguments and result picklable."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args, kwargs), name=name, daemon=False)
    started = time.monotonic()
    process.start()
    sender.close()  # the child holds the only writing end: its death is seen as EOF
    try:
        try:
            status, payload, child_traceback = receiver.recv()
        except EOFError:
            status, payload, child_traceback = "died", None, None
        process.join()
    except BaseException:
        _stop(process, grace_s)
        raise
    finally:
        receiver.close()
    ended = WorkerExit(pid=process.pid, exitcode=process.exitcode, seconds=time.monotonic() - started)
    if status == "ok":
        return payload, ended
    if status == "died":
        how = f"exit code {ended.exitcode}"
        if ended.exitcode is not None and ended.exitcode < 0:  # killed by a signal; SIGKILL is often the OOM killer
            how = f"signal {signal.Signals(-ended.exitcode).name}"
        raise WorkerDied(f"{name or 'worker'} (pid {ended.pid}) ended by {how} without a result")
    payload.add_note(f"raised in {name or 'worker'} (pid {ended.pid}):\n{child_traceback.rstrip()}")
    raise payload
