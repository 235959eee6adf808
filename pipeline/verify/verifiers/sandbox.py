"""Runs an untrusted Python program with no network, no view of the host's secrets, and hard limits.

bubblewrap gives each program its own mount, pid, net, ipc and uts namespaces: it sees the system folders and the
Python installation read-only, plus small private tmpfs folders. Started by root, bwrap keeps every capability unless
told otherwise, and RLIMIT_NPROC does not bind uid 0; so a launcher inside the sandbox switches to a uid of its own
(one per concurrent run) before the program starts, which drops the capabilities and makes the fork limit real.
Where bubblewrap cannot run, a run is refused (`SandboxUnavailable`) unless the settings name the fallback,
`isolation: rlimit`: it keeps the limits, the fresh session, the clean environment and the uid switch, and adds an
audit hook against network, process spawning, and touching files outside the work folder. That hook is a speed bump,
not a wall: Python's audit hooks are no security boundary.

Memory and process limits hold for the sandbox as a whole where the machine allows a cgroup per run (see cgroups):
rlimits alone bind each process on its own, so a program that forks would get the memory limit once per process. The
rlimits stay as a second line; `SandboxResult.limits` says in every verdict which limits held.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.verify.config import CodeConfig
from pipeline.verify.verifiers import cgroups, suite_harness

FILE_SIZE_LIMIT_BYTES = 10 * 2**20  # RLIMIT_FSIZE: no single file written may be larger
TMPFS_SIZE_BYTES = 64 * 2**20  # the sandbox's work folder and /tmp live in memory; this caps each
SANDBOX_UID_BASE = 1_000_000  # uids from here on run programs; each run gets one nobody else uses
SANDBOX_WORK_DIR = "/sandbox"
_DRAIN_GRACE_S = 1.0  # after the program exits, how long output from leftover children is still awaited
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
_MARKER = b"ok"  # what the launcher writes just before it hands over to the program
_PR_SET_PDEATHSIG = 1
_STDERR_TAIL_CHARS = 2000

# Runs inside the sandbox before the program: after it writes the marker, whatever fails is the program's fault.
# With a test suite, it hands over to the suite harness instead, which runs the program in a child process.
_LAUNCHER = r"""
import json, os, resource, runpy, sys
cfg = json.loads(sys.argv[1])
for fd in cfg["cgroup_fds"]:  # joined before anything else runs, so that all the program forks is inside
    os.write(fd, b"0")
    os.close(fd)
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
for name, soft, hard in cfg["limits"]:
    resource.setrlimit(getattr(resource, name), (soft, hard))


def enter_program():
    if not cfg["guard"]:
        return
    work = os.path.realpath(cfg["work_dir"])
    readable = [os.path.realpath(p) for p in cfg["readable"] + [sys.base_prefix, sys.prefix]] + [work]
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyaddr", "subprocess.Popen", "os.system", "os.exec",
               "os.posix_spawn", "os.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle"}
    changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.truncate",
               "os.chmod", "os.chown", "os.utime", "shutil.rmtree"}
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, roots):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return True
        real = os.path.realpath(os.fsdecode(path))
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)

    def guard(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        roots = [work] if event != "open" or args[2] & writing_flags else [*readable, f"/proc/{os.getpid()}"]
        if event == "open" and not inside(args[0], roots):
            raise PermissionError(f"sandbox: open of {args[0]!r} is not allowed")
        if event in changes and not all(inside(arg, roots) for arg in args[:2]):
            raise PermissionError(f"sandbox: {event} outside the work folder is not allowed")

    sys.addaudithook(guard)


if cfg["suite"] is not None:  # the harness writes the marker itself once the candidate's process is started
    harness = {"__name__": "distill_suite_harness"}
    exec(compile(cfg["suite"]["harness"], "suite_harness.py", "exec"), harness)
    harness["main"](cfg, enter_program)
os.write(cfg["marker_fd"], b"ok")
os.close(cfg["marker_fd"])
enter_program()
sys.argv = [cfg["program"]]
del cfg
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class SandboxResult:
    exit_code: int | None  # None when the program was killed by the harness (deadline, output cap)
    stdout: str
    stderr: str
    timed_out: bool
    output_exceeded: bool
    isolation: str  # "bwrap" | "rlimit"
    wall_s: float
    setup_error: str | None = None  # the sandbox itself failed before the program ran: an infrastructure fault
    report: str = ""  # with a test suite: the checker's JSON report (empty when the checker wrote none)
    limits: str = "per_process"  # "cgroup_v2" | "cgroup_v1": memory and processes limited for the whole sandbox
    memory_exceeded: bool = False  # the kernel killed a process of the sandbox for going over its memory limit


class _UidPool:
    """Hands each concurrent run its own uid, so that RLIMIT_NPROC counts that run's processes alone. Round-robin:
    the zombies of a killed fork bomb still count against RLIMIT_NPROC until init reaps them."""

    def __init__(self, size: int = 1024) -> None:
        self._lock, self._taken, self._size, self._next = threading.Lock(), set(), size, 0

    def uids(self) -> range:
        """This process's uids; other verifier processes use other ranges (unless their pids collide mod 10,000)."""
        start = SANDBOX_UID_BASE + (os.getpid() % 10_000) * self._size
        return range(start, start + self._size)

    def acquire(self) -> int:
        base = self.uids().start
        with self._lock:
            while base + self._next in self._taken:
                self._next = (self._next + 1) % self._size
            uid, self._next = base + self._next, (self._next + 1) % self._size
            self._taken.add(uid)
            return uid

    def release(self, uid: int) -> None:
        with self._lock:
            self._taken.discard(uid)


def sandbox_uids() -> range:
    """The uids this process runs programs as (when root): a process of one of them still alive is a leak."""
    return _UIDS.uids()


class SandboxUnavailable(RuntimeError):
    """The isolation the settings ask for cannot run on this machine: refused before any row is judged."""


def _not_started(isolation: str, error: str) -> SandboxResult:
    return SandboxResult(None, "", "", False, False, isolation, 0.0, setup_error=error)


_UIDS = _UidPool()
_LINUX = sys.platform == "linux"
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if _LINUX else None


def _die_with_parent() -> None:
    """Runs in the forked child (after its uid switch, which would reset it): the verifier's death kills it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _base_python() -> str:
    candidate = os.path.join(sys.base_prefix, "bin", "python3")
    return candidate if os.path.exists(candidate) else os.path.realpath(sys.executable)


def _limits(cfg: CodeConfig) -> list[tuple[str, int, int]]:
    """(soft, hard): a CPU hog gets SIGXCPU first, so that the verdict can tell it from other deaths."""
    fixed = [("RLIMIT_AS", cfg.memory_mb * 2**20), ("RLIMIT_NPROC", cfg.max_processes), ("RLIMIT_CORE", 0)]
    fixed += [("RLIMIT_NOFILE", cfg.max_open_files), ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_BYTES)]
    return [("RLIMIT_CPU", cfg.cpu_s, cfg.cpu_s + 1)] + [(name, value, value) for name, value in fixed]


def _environment(work_dir: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8"}
    return env | {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _bwrap_argv(bwrap: str, python: str, program_fd: int, privileged: bool) -> list[str]:
    """Only what Python needs is bound; in particular not the rest of the home folder holding the installation."""
    if privileged:  # a user namespace would map uid 0 alone, leaving the launcher no uid to switch to
        argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv = [bwrap, "--unshare-all"]
    argv += ["--die-with-parent", "--new-session", "--clearenv"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == path or prefix.startswith(path + "/") for path in _SYSTEM_DIRS):
        parents = prefix.split("/")[1:-1]
        for depth in range(1, len(parents) + 1):  # world-traversable, unlike /root on the host
            argv += ["--perms", "0755", "--dir", "/" + "/".join(parents[:depth])]
        argv += ["--ro-bind", prefix, prefix]
    size = str(TMPFS_SIZE_BYTES)
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
    argv += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
    argv += ["--perms", "0777", "--size", size, "--tmpfs", SANDBOX_WORK_DIR, "--chdir", SANDBOX_WORK_DIR]
    argv += ["--perms", "0644", "--file", str(program_fd), f"{SANDBOX_WORK_DIR}/main.py"]
    for key, value in _environment(SANDBOX_WORK_DIR).items():
        argv += ["--setenv", key, value]
    return [*argv, "--", python]


@functools.cache
def _bwrap_problem(bwrap: str | None) -> str | None:
    """Why bubblewrap cannot run here (None when a trial run succeeds); checked once per bwrap binary."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    cfg = CodeConfig(isolation="bwrap", timeout_s=20, workers=1)
    uid = _UIDS.acquire() if os.geteuid() == 0 else None
    try:
        result = _run_bwrap("pass", "", None, cfg, uid, time.monotonic(), None)
    finally:
        if uid is not None:
            _UIDS.release(uid)
    if result.exit_code == 0 and result.setup_error is None:
        return None
    return (result.setup_error or result.stderr or f"exit status {result.exit_code}").strip()[-_STDERR_TAIL_CHARS:]


def resolve_isolation(cfg: CodeConfig) -> str:
    """The isolation runs under cfg get; raises SandboxUnavailable, naming the fix, where bubblewrap cannot run.

    "auto" and "bwrap" both need bubblewrap: the rlimit fallback is no security boundary, so it runs only when the
    settings name it.
    """
    if cfg.isolation == "rlimit":
        return "rlimit"
    problem = _bwrap_problem(shutil.which("bwrap"))
    if problem is None:
        return "bwrap"
    raise SandboxUnavailable(
        f"verify.code.isolation={cfg.isolation}: the bubblewrap sandbox cannot run here ({problem}). Install "
        "bubblewrap (`apt-get install bubblewrap`, done by `make setup`), and where it is installed but fails, allow "
        "unprivileged user namespaces (`sysctl -w kernel.unprivileged_userns_clone=1`, and on Ubuntu 24.04 "
        "`kernel.apparmor_restrict_unprivileged_userns=0`) or run the verifier as root. To accept the weaker "
        "fallback (rlimits and an audit hook: no network or pid namespace, not a security boundary), set "
        "verify.code.isolation=rlimit explicitly."
    )


def cgroup_support() -> tuple[str | None, tuple[Path, ...], str | None]:
    """cgroups.available, probed with a uid no run uses (when root) since the fallback's launcher joins as its uid."""
    return cgroups.available(SANDBOX_UID_BASE - 1 if os.geteuid() == 0 else None)


def resolve_limits(cfg: CodeConfig) -> str:
    """The limits runs under cfg get: "cgroup_v2" or "cgroup_v1" for the whole sandbox, else "per_process" rlimits;
    raises SandboxUnavailable where the settings ask for cgroups and none can be made."""
    if cfg.limits == "per_process":
        return "per_process"
    kind, _, problem = cgroup_support()
    if kind is not None:
        return kind
    if cfg.limits == "auto":
        return "per_process"
    raise SandboxUnavailable(
        f"verify.code.limits=cgroup: no cgroup can be made for a sandbox run here ({problem}). Run the verifier as "
        "root with cgroup v2 delegating the memory and pids controllers to its cgroup, or with cgroup v1's memory and "
        "pids hierarchies mounted read-write; or set verify.code.limits=auto to accept per-process rlimits."
    )


@functools.cache
def _fallback_python(drop_privileges: bool) -> str | None:
    """The interpreter the dropped uid can execute: a root-only home folder hides the one this process runs."""
    candidates = [_base_python(), os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    uid = SANDBOX_UID_BASE - 1 if drop_privileges else None  # a uid no run uses, so no sweep kills the probe
    return next((python for python in dict.fromkeys(candidates) if _runs_as(python, uid)), None)


def _runs_as(python: str, uid: int | None) -> bool:
    probe = [python, "-I", "-c", "import json, resource, runpy"]
    account = {"user": uid, "group": uid, "extra_groups": None if uid is None else []}
    try:
        return subprocess.run(probe, **account, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_python(program: str, stdin: str = "", *, cfg: CodeConfig, suite: dict | None = None) -> SandboxResult:
    """Run program under cfg's limits; never raises for anything the program does.

    With suite ({"tests", "entry_point", "prompt"}), the program is the candidate and the suite harness's checker
    judges it: `report` holds the checker's verdict.
    """
    isolation, limits = resolve_isolation(cfg), resolve_limits(cfg)
    group = None
    if limits != "per_process":
        try:
            group = cgroups.SandboxCgroup(limits, cgroup_support()[1], cfg.memory_mb * 2**20, cfg.max_processes)
        except OSError as exc:
            return _not_started(isolation, f"cannot make the run's cgroup: {exc!r}")
    uid = _UIDS.acquire() if os.geteuid() == 0 else None
    started = time.monotonic()
    try:
        run = _run_bwrap if isolation == "bwrap" else _run_rlimit
        result = run(program, stdin, suite, cfg, uid, started, group)
        result.limits = limits
        result.memory_exceeded = group is not None and group.oom_killed()
        return result
    finally:
        if group is not None:  # kills what is left of the run
            group.remove()
        if uid is not None:
            _UIDS.release(uid)


@functools.cache
def _harness_source() -> str:
    return Path(suite_harness.__file__).read_text()


@contextlib.contextmanager
def _suite_file(suite: dict[str, str] | None):
    """The suite as an unlinked file the checker reads by descriptor; None without a suite."""
    if suite is None:
        yield None
        return
    with tempfile.TemporaryFile() as handle:
        handle.write(json.dumps({key: suite[key] for key in ("tests", "entry_point", "prompt")}).encode())
        handle.flush()
        handle.seek(0)
        yield handle.fileno()


def _launch(limits: list, program: str, suite: dict[str, str] | None, suite_fd: int | None, group, **extra) -> dict:
    harness = None if suite is None else {"fd": suite_fd, "entry_point": suite["entry_point"]}
    if harness is not None:
        harness["harness"] = _harness_source()
    cgroup_fds = [] if group is None else group.join_fds
    return {"limits": limits, "program": program, "suite": harness, "cgroup_fds": cgroup_fds, **extra}


def _run_bwrap(program, stdin, suite, cfg: CodeConfig, uid: int | None, started: float, group) -> SandboxResult:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return _not_started("bwrap", "bubblewrap (bwrap) is not installed")
    with tempfile.TemporaryFile() as program_file, _suite_file(suite) as suite_fd:
        program_file.write(program.encode())
        program_file.flush()
        program_file.seek(0)
        argv = _bwrap_argv(bwrap, _base_python(), program_file.fileno(), privileged=uid is not None)
        launch = _launch(_limits(cfg), "main.py", suite, suite_fd, group, uid=uid, guard=False)
        fds = [program_file.fileno(), *launch["cgroup_fds"]] + ([] if suite_fd is None else [suite_fd])
        popen = {"env": _environment(SANDBOX_WORK_DIR), "cwd": "/", "pass_fds": fds}
        return _supervise(argv, launch, popen, stdin, cfg, "bwrap", started)


def _run_rlimit(program, stdin, suite, cfg: CodeConfig, uid: int | None, started: float, group) -> SandboxResult:
    python = _fallback_python(uid is not None)
    if python is None:
        return _not_started("rlimit", f"no Python interpreter runs as uid {uid}")
    work_dir = tempfile.mkdtemp(prefix="distill-sandbox-")
    try:
        if uid is not None:
            os.chown(work_dir, uid, uid)
        with open(os.path.join(work_dir, "main.py"), "w") as handle:
            handle.write(program)
        with _suite_file(suite) as suite_fd:
            launch = _launch(_limits(cfg), "main.py", suite, suite_fd, group, uid=None, guard=True, work_dir=work_dir)
            launch["readable"] = ["/usr", "/lib", "/lib64", "/bin", "/etc", "/dev"]
            fds = launch["cgroup_fds"] + ([] if suite_fd is None else [suite_fd])
            popen = {"env": _environment(work_dir), "cwd": work_dir, "user": uid, "group": uid, "pass_fds": fds}
            popen |= {"extra_groups": [] if uid is not None else None, "preexec_fn": _die_with_parent}
            return _supervise([python], launch, popen, stdin, cfg, "rlimit", started)
    finally:
        if uid is not None:  # kill(-1) as that uid reaches the processes that left the program's process group
            sweep = "import os\ntry: os.kill(-1, 9)\nexcept ProcessLookupError: pass"
            subprocess.run([python, "-I", "-S", "-c", sweep], user=uid, group=uid, extra_groups=[], check=False)
        shutil.rmtree(work_dir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _feed(pipe, data: bytes) -> None:
    """Runs in a thread: a program may read its input slowly or never, which must not stall the output loop."""
    with contextlib.suppress(OSError):  # the program closed its stdin or died
        pipe.write(data)
    with contextlib.suppress(OSError):
        pipe.close()


def _supervise(argv, launch, popen, stdin, cfg, isolation, started) -> SandboxResult:
    """Feed stdin and collect capped output until the program ends, overruns the deadline or writes too much."""
    marker_read, marker_write = os.pipe()
    launch["marker_fd"] = marker_write
    popen["pass_fds"] = [*popen["pass_fds"], marker_write]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    try:
        argv = [*argv, "-I", "-c", _LAUNCHER, json.dumps(launch)]
        proc = subprocess.Popen(argv, **pipes, **popen, start_new_session=True)
    except OSError as exc:
        os.close(marker_read)
        return _not_started(isolation, f"cannot start: {exc}")
    finally:
        os.close(marker_write)
    outputs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), marker_read: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    threading.Thread(target=_feed, args=(proc.stdin, stdin.encode()), daemon=True).start()
    try:  # readable when the process ends; without it (old kernel, seccomp, not Linux) the loop polls
        pidfd = os.pidfd_open(proc.pid) if _LINUX else None
    except OSError:
        pidfd = None
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ)
    deadline, exited_at, exceeded, open_outputs = started + cfg.timeout_s, None, False, set(outputs)
    try:
        while not exceeded:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                _kill_group(proc.pid)
            if exited_at is not None and (not open_outputs or now >= exited_at + _DRAIN_GRACE_S):
                break
            wait = min(deadline, exited_at + _DRAIN_GRACE_S if exited_at else deadline) - now
            if wait <= 0:
                break
            for key, _ in selector.select(wait if pidfd is not None else min(wait, 0.02)):
                if key.fd == pidfd:
                    selector.unregister(pidfd)
                elif chunk := os.read(key.fd, 65536):
                    outputs[key.fd] += chunk
                    if key.fd != marker_read and len(outputs[key.fd]) > cfg.max_output_bytes:
                        exceeded = True
                else:
                    selector.unregister(key.fd)
                    open_outputs.discard(key.fd)
    finally:
        timed_out = exited_at is None and not exceeded and proc.poll() is None
        _kill_group(proc.pid)
        proc.wait()
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
        for fd in (marker_read, pidfd):
            if fd is not None:
                os.close(fd)
    stdout, stderr = (bytes(outputs[fd][: cfg.max_output_bytes]).decode(errors="replace") for fd in list(outputs)[:2])
    started_ok = outputs[marker_read].startswith(_MARKER)
    setup_error = None if started_ok else f"sandbox did not start the program: {stderr[-_STDERR_TAIL_CHARS:]}"
    report = bytes(outputs[marker_read][len(_MARKER) :]).decode(errors="replace")  # written by the checker alone
    exit_code = None if timed_out or exceeded else proc.returncode
    wall_s = time.monotonic() - started
    return SandboxResult(exit_code, stdout, stderr, timed_out, exceeded, isolation, wall_s, setup_error, report)
