"""`eval.worker.run_in_process`: a call in a spawned process, its result or its error back, never a child left over."""

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from eval.worker import WorkerDied, run_in_process


def add_and_report_pid(a: int, b: int, *, scale: int = 1) -> tuple[int, int]:
    return (a + b) * scale, os.getpid()


def fail_with_a_named_file(path: str) -> None:
    raise FileNotFoundError(f"no benchmark file {path}")


def die_without_a_word() -> None:
    os._exit(7)  # as a native crash would leave it: no exception, no result


def be_killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does


def wait_until_interrupted(folder: str) -> None:
    Path(folder, "pid").write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.05)
    finally:  # what an interrupted generate stage does: close its parts
        Path(folder, "cleaned-up").write_text("yes")


def test_the_result_comes_back_from_another_process():
    (total, child_pid), ended = run_in_process(add_and_report_pid, 2, 3, scale=10, name="adder")
    assert total == 50
    assert child_pid == ended.pid and child_pid != os.getpid()
    assert ended.exitcode == 0 and ended.seconds > 0
    assert not psutil.pid_exists(ended.pid) or psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE


def test_each_call_gets_a_fresh_process():
    pids = {run_in_process(add_and_report_pid, i, i)[1].pid for i in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids


def test_the_childs_exception_is_raised_here_with_its_traceback():
    with pytest.raises(FileNotFoundError, match=r"no benchmark file b\.jsonl") as raised:
        run_in_process(fail_with_a_named_file, "b.jsonl", name="eval worker of student")
    (note,) = raised.value.__notes__
    assert note.startswith("raised in eval worker of student (pid ")
    assert "in fail_with_a_named_file" in note  # the child's own frame


def test_a_child_that_dies_without_a_result_is_an_error_naming_its_exit_code():
    with pytest.raises(WorkerDied, match=r"eval worker of teacher \(pid \d+\) ended by exit code 7 without"):
        run_in_process(die_without_a_word, name="eval worker of teacher")
    with pytest.raises(WorkerDied, match=r"ended by signal SIGKILL without a result"):
        run_in_process(be_killed)


def test_an_interrupt_of_the_parent_stops_the_child_after_its_cleanup(tmp_path):
    """Ctrl-C (or SIGTERM, which `distill` raises as KeyboardInterrupt) while a model is evaluated: the child is
    interrupted too, runs its finally blocks, and is gone when the parent's KeyboardInterrupt propagates."""
    pid_file = tmp_path / "pid"

    def interrupt_when_started():
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # to this process only, as a scheduler's signal would come

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_in_process(wait_until_interrupted, str(tmp_path), grace_s=60)
    child = int(pid_file.read_text())
    assert (tmp_path / "cleaned-up").read_text() == "yes"
    assert not psutil.pid_exists(child)
