"""Hostile programs against both isolations: each must be contained, fail, end by its deadline, and leave the host as
it was. The rlimit fallback relies on switching to an unprivileged uid, so its hostile cases need root."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.verify.config import CodeConfig
from pipeline.verify.verifiers import cgroups, sandbox
from pipeline.verify.verifiers.sandbox import SandboxUnavailable, resolve_isolation, run_python, sandbox_uids

TIMEOUT_S = 5.0
SLACK_S = 3.0
IS_ROOT = os.geteuid() == 0


def _bwrap_runs() -> bool:
    try:
        return resolve_isolation(CodeConfig(isolation="bwrap")) == "bwrap"
    except SandboxUnavailable:
        return False


HAS_BWRAP = _bwrap_runs()
CGROUPS, CGROUP_PARENTS, NO_CGROUPS = sandbox.cgroup_support()
needs_cgroups = pytest.mark.skipif(CGROUPS is None, reason=f"no cgroup for a sandbox run here: {NO_CGROUPS}")


def _sandbox_processes() -> list[int]:
    """Live processes of the sandbox uids; zombies are dead already and only wait for init to reap them."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue  # the process ended while we looked
        if int(fields["Uid"].split()[0]) in sandbox_uids() and not fields["State"].startswith("Z"):
            pids.append(int(status.parent.name))
    return pids


@pytest.fixture(params=["bwrap", "rlimit"])
def isolation(request):
    if request.param == "bwrap" and not HAS_BWRAP:
        pytest.skip("bubblewrap does not run here")
    return request.param


@pytest.fixture
def hostile(isolation):
    """The isolation to attack; afterwards the host must still start processes and no sandbox process may linger."""
    if isolation == "rlimit" and not IS_ROOT:
        pytest.skip("the rlimit fallback protects the host only when it can switch to another uid")
    yield isolation
    assert subprocess.run(["true"], timeout=10).returncode == 0
    deadline = time.monotonic() + 2
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


def _run(program: str, isolation: str, stdin: str = "", **overrides):
    limits = {"timeout_s": TIMEOUT_S, "cpu_s": 3, "max_processes": 32, "workers": 1, **overrides}
    cfg = CodeConfig(isolation=isolation, **limits)
    result = run_python(program, stdin, cfg=cfg)
    assert result.isolation == isolation
    assert result.setup_error is None, result.setup_error
    assert result.wall_s <= TIMEOUT_S + SLACK_S
    return result


def _failed(result) -> bool:
    return result.exit_code != 0 or result.timed_out or result.output_exceeded


def test_auto_picks_bubblewrap_where_it_runs_and_never_falls_back_unasked(monkeypatch):
    if HAS_BWRAP:
        assert resolve_isolation(CodeConfig(isolation="auto")) == "bwrap"
    assert resolve_isolation(CodeConfig(isolation="rlimit")) == "rlimit"
    monkeypatch.setenv("PATH", "/nonexistent")
    for isolation in ("auto", "bwrap"):
        with pytest.raises(SandboxUnavailable, match=r"verify\.code\.isolation=rlimit"):
            run_python("print(1)", cfg=CodeConfig(isolation=isolation))
    assert run_python("print(1)", cfg=CodeConfig(isolation="rlimit")).stdout == "1\n"


def test_a_suite_run_reports_through_the_checker_alone(isolation):
    """The candidate's stdout and exit status are not the verdict: the report comes from the checker process."""
    suite = {"tests": "def check(candidate):\n    assert candidate(3) == 9\n", "entry_point": "f", "prompt": ""}
    passing = _run_suite("def f(x):\n    print('{\"passed\": false}')\n    return x * x", isolation, suite)
    failing = _run_suite(
        "import os\ndef f(x):\n    os.write(1, b'{\"passed\": true}')\n    return 0", isolation, suite
    )
    assert json.loads(passing.report) == {"passed": True}
    assert json.loads(failing.report)["passed"] is False
    assert passing.limits == failing.limits == (CGROUPS or "per_process")


def test_the_candidate_of_a_suite_is_contained_like_any_program(hostile):
    suite = {"tests": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f", "prompt": ""}
    result = _run_suite("import os\ndef f():\n    while True:\n        os.fork()", hostile, suite)
    assert json.loads(result.report)["passed"] is False


def _run_suite(program: str, isolation: str, suite: dict):
    cfg = CodeConfig(isolation=isolation, timeout_s=TIMEOUT_S, cpu_s=3, max_processes=32, workers=1)
    result = run_python(program, cfg=cfg, suite=suite)
    assert result.setup_error is None, result.setup_error
    assert result.wall_s <= TIMEOUT_S + SLACK_S
    return result


def test_a_correct_program_passes_and_reads_its_stdin(isolation):
    numbers = "\n".join(str(i) for i in range(100_000))  # more than a pipe buffer
    result = _run("import sys\nprint(sum(int(line) for line in sys.stdin))", isolation, stdin=numbers)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, f"{sum(range(100_000))}\n", False)


def test_a_failing_program_reports_its_exit_code_and_stderr(isolation):
    result = _run("import sys\nprint('partial')\nraise SystemExit('boom')", isolation)
    assert (result.exit_code, result.stdout, result.stderr) == (1, "partial\n", "boom\n")


@pytest.mark.parametrize("body", ["os.fork()", "try:\n        os.fork()\n    except OSError:\n        pass"])
def test_fork_bomb_is_contained(hostile, body):
    result = _run(f"import os\nwhile True:\n    {body}", hostile)
    assert _failed(result)


def test_deleting_the_home_folder_spares_the_host(hostile):
    canary = Path.home() / f".distill_canary_{uuid.uuid4().hex}"
    canary.write_text("alive")
    program = (
        f"import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\nos.remove({str(canary)!r})"
    )
    try:
        result = _run(program, hostile)
        assert _failed(result)
        assert canary.read_text() == "alive"
    finally:
        canary.unlink()


def test_writes_outside_the_work_folder_do_not_reach_the_host(hostile):
    name = f"distill_escape_{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"{Path.cwd()}/{name}", f"/etc/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"]
    program = (
        f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
    )
    _run(program, hostile)
    assert [path for path in targets if os.path.exists(path)] == []


def test_no_network_not_even_to_the_hosts_loopback(hostile):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = (
            "import socket\n"
            "try:\n    socket.getaddrinfo('example.com', 80)\n    print('RESOLVED')\nexcept OSError:\n    pass\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')"
        )
        result = _run(program, hostile)
        assert _failed(result)
        assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_allocating_20_gb_fails_with_memory_error(hostile):
    result = _run("data = bytearray(20 * 1024**3)", hostile)
    assert _failed(result)
    assert "MemoryError" in result.stderr


def test_an_infinite_loop_is_stopped(hostile):
    result = _run("while True:\n    pass", hostile)
    assert _failed(result)


def test_a_sleeper_ignoring_sigterm_is_killed_at_the_deadline(hostile):
    program = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)"
    result = _run(program, hostile, cpu_s=100)
    assert result.timed_out and result.exit_code is None
    assert result.wall_s >= TIMEOUT_S - 0.5


def test_killing_its_parents_hurts_nobody_outside(hostile):
    program = (
        "import os, signal\n"
        "for attack in (lambda: os.kill(os.getppid(), 9), lambda: os.killpg(os.getpgid(os.getppid()), 9),\n"
        "               lambda: os.kill(-1, 9), lambda: os.kill(1, 9)):\n"
        "    try:\n        attack()\n    except OSError:\n        pass\n"
        "raise SystemExit(1)"
    )
    _run(program, hostile)
    assert _run("print('still here')", hostile).stdout == "still here\n"


def test_the_verifiers_environment_secrets_stay_hidden(hostile, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_SECRET", "s3cr3t")
    program = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in ['1', str(os.getppid()), 'self', *[p for p in os.listdir('/proc') if p.isdigit()]]:\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError:\n        pass\n"
    )
    result = _run(program, hostile)
    assert "s3cr3t" not in result.stdout + result.stderr


def test_the_host_files_are_out_of_sight(hostile):
    program = f"print(open({str(Path.cwd() / 'pyproject.toml')!r}).read())"
    result = _run(program, hostile)
    assert _failed(result) and "[project]" not in result.stdout
    if hostile == "bwrap":
        program = "import json, os\nprint(json.dumps([os.listdir('/root'), os.path.exists('/work')]))"
        root_listing, work_visible = json.loads(_run(program, hostile).stdout)
        assert set(root_listing) <= {".pyenv"} and not work_visible  # only the Python installation, no repository


def test_a_gigabyte_of_output_is_cut_off_quickly(hostile):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    program = "import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(chunk)"
    result = _run(program, hostile, max_output_bytes=100_000)
    assert result.output_exceeded and result.exit_code is None
    assert len(result.stdout) == 100_000
    assert result.wall_s < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


# Four children hold 60% of the memory limit each at the same time; each alone is well within it.
FORKED_ALLOCATIONS = """
import os, sys, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        data = b"x" * (96 * 2**20)
        time.sleep(1)
        os._exit(0)
    children.append(pid)
statuses = [os.waitpid(pid, 0)[1] for pid in children]
print(statuses)
sys.exit(1 if any(statuses) else 0)
"""


def _leftover_cgroups() -> list[Path]:
    return [path for parent in CGROUP_PARENTS for path in parent.glob(f"{cgroups.PREFIX}{os.getpid()}-*")]


@needs_cgroups
def test_forked_children_share_one_memory_limit(hostile):
    result = _run(FORKED_ALLOCATIONS, hostile, memory_mb=160)
    assert (result.limits, result.memory_exceeded) == (CGROUPS, True)
    assert result.exit_code == 1 and "9" in result.stdout  # SIGKILLed by the kernel at the cgroup's limit


def test_per_process_limits_give_each_forked_child_the_whole_limit(hostile):
    result = _run(FORKED_ALLOCATIONS, hostile, memory_mb=160, limits="per_process")
    assert (result.exit_code, result.stdout, result.limits, result.memory_exceeded) == (
        0,
        "[0, 0, 0, 0]\n",
        "per_process",
        False,
    )


@needs_cgroups
def test_pids_max_alone_bounds_a_fork_tree(hostile, monkeypatch):
    """Without RLIMIT_NPROC (which the uid switch also makes per sandbox), the cgroup stops children and grandchildren
    together: the tree ends with exactly max_processes processes."""
    with_nproc = sandbox._limits
    monkeypatch.setattr(sandbox, "_limits", lambda cfg: [lim for lim in with_nproc(cfg) if lim[0] != "RLIMIT_NPROC"])
    program = (
        "import os, time\nread, write = os.pipe()\nos.set_blocking(read, False)\n"
        "def child():\n    os.write(write, b'x')\n    time.sleep(30)\n    os._exit(0)\n"
        "while True:\n    try:\n        if os.fork() == 0:\n            try:\n                if os.fork() == 0:\n"
        "                    child()\n            except OSError:\n                pass\n            child()\n"
        "    except OSError:\n        break\n"
        "time.sleep(0.5)\nprint(1 + len(os.read(read, 4096)))"
    )
    result = _run(program, hostile, max_processes=24)
    assert (result.exit_code, result.stdout, result.limits) == (0, "24\n", CGROUPS)


@needs_cgroups
def test_each_run_removes_its_cgroup_after_killing_what_is_left(hostile):
    program = (
        "import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(1000)\nprint('parent done')"
    )
    assert _run(program, hostile).stdout == "parent done\n"
    assert _leftover_cgroups() == []


@needs_cgroups
def test_removing_a_cgroup_kills_the_processes_still_in_it():
    """The last line of cleanup, for what outlived the process group, the uid sweep and the pid namespace."""
    group = cgroups.SandboxCgroup(CGROUPS, CGROUP_PARENTS, 64 * 2**20, 8)
    joins = "".join(f"os.write({fd}, b'0')\n" for fd in group.join_fds)
    program = f"import os, time\n{joins}if os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\ntime.sleep(1000)"
    parent = subprocess.Popen([sys.executable, "-I", "-c", program], pass_fds=group.join_fds)
    deadline = time.monotonic() + 5
    while len((group.folders[0] / "cgroup.procs").read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (
        len((group.folders[0] / "cgroup.procs").read_text().split()) == 2
    )  # parent and child, in a session of its own
    group.remove()
    assert parent.wait(timeout=5) == -9
    assert _leftover_cgroups() == []  # a cgroup with a process still alive in it cannot be removed


def test_where_no_cgroup_can_be_made_runs_keep_per_process_limits_or_are_refused(monkeypatch):
    monkeypatch.setattr(cgroups, "available", lambda probe_uid: (None, (), "OSError: read-only file system"))
    assert run_python("print(1)", cfg=CodeConfig(isolation="rlimit", workers=1)).limits == "per_process"
    with pytest.raises(SandboxUnavailable, match=r"read-only file system.*verify\.code\.limits=auto"):
        run_python("print(1)", cfg=CodeConfig(isolation="rlimit", limits="cgroup", workers=1))
