"""Memory and process limits for a sandbox run as a whole, through a cgroup of its own.

rlimits bind each process alone: a program that forks four children gets four times RLIMIT_AS. A cgroup counts the
whole process tree, so each run gets a child cgroup of the verifier's own, with a memory limit and a pids limit: under
cgroup v2 where the verifier's cgroup enables the memory and pids controllers for its children
(`cgroup.subtree_control`), else in the separate memory and pids hierarchies of cgroup v1. The sandbox launcher joins
it through inherited descriptors of its `cgroup.procs` files (opened here, so that the kernel checks the verifier's
rights), before it drops privileges and before the program starts: nothing the program forks is ever outside.
Afterwards the processes left are killed and the cgroup is removed. Where no cgroup can be made (not root, read-only,
controllers missing), `limits: auto` keeps the per-process rlimits alone, and each verdict says which limits held.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

V2, V1 = "cgroup_v2", "cgroup_v1"
PREFIX = "distill-sandbox-"
_PROBE_BYTES = 64 * 2**20
_REMOVE_TIMEOUT_S = 10.0
_NAMES = itertools.count()  # next() on it is atomic, so concurrent runs from threads get distinct names


def _own_cgroups() -> dict[str, str]:
    """The verifier's cgroup path per hierarchy: "" for the v2 one, the controller names joined by "," for v1."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    return own


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root inside the hierarchy, mount point, options) of each cgroup mount."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _, options = tail.split(" ", 2)
        if fstype in ("cgroup", "cgroup2"):
            _, _, _, root, point = fields.split(" ")[:5]
            mounts.append((fstype, root, point, set(options.split(","))))
    return mounts


def _folder(point: str, root: str, path: str) -> Path | None:
    """Where cgroup `path` of a hierarchy mounted at `point` (from `root` down) is; None when the mount hides it."""
    if root == "/":
        return Path(point + path)
    if path != root and not path.startswith(root + "/"):
        return None
    return Path(point + path[len(root) :])


def _parents() -> tuple[str, tuple[Path, ...]]:
    """The kind of cgroups runs get and the folders their cgroups go under; raises OSError naming what is missing."""
    own, mounts = _own_cgroups(), _mounts()
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2" and "" in own and (parent := _folder(point, root, own[""])) is not None:
            delegated = set((parent / "cgroup.subtree_control").read_text().split())
            if {"memory", "pids"} <= delegated:
                return V2, (parent,)
    parents = []
    for controller in ("memory", "pids"):
        key = next((key for key in own if controller in key.split(",")), None)
        mount = next(
            ((point, root) for fs, root, point, opts in mounts if fs == "cgroup" and controller in opts), None
        )
        folder = None if key is None or mount is None else _folder(*mount, own[key])
        if folder is None:
            raise OSError(f"no cgroup v2 delegating memory and pids, and no cgroup v1 {controller} hierarchy in view")
        parents.append(folder)
    return V1, tuple(dict.fromkeys(parents))  # one folder where both controllers share a hierarchy


class SandboxCgroup:
    """One run's cgroup (in both v1 hierarchies under v1). `join_fds` are for the launcher: it writes "0" to each."""

    def __init__(self, kind: str, parents: tuple[Path, ...], memory_bytes: int, max_processes: int) -> None:
        name = f"{PREFIX}{os.getpid()}-{next(_NAMES)}"
        self.kind, self.folders, self.join_fds = kind, [], []
        try:
            for parent in parents:
                (parent / name).mkdir()
                self.folders.append(parent / name)
            memory = {V2: "memory.max", V1: "memory.limit_in_bytes"}[kind]
            swap = {V2: ("memory.swap.max", "0"), V1: ("memory.memsw.limit_in_bytes", str(memory_bytes))}[kind]
            for folder in self.folders:
                if (folder / memory).exists():
                    (folder / memory).write_text(str(memory_bytes))
                    if (folder / swap[0]).exists():  # without swap accounting (or swap) the file is absent
                        (folder / swap[0]).write_text(swap[1])
                if (folder / "pids.max").exists():
                    (folder / "pids.max").write_text(str(max_processes))
                self.join_fds.append(os.open(folder / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except BaseException:
            self.remove()
            raise

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the run for going over the memory limit."""
        events = self.folders[0] / ("memory.events" if self.kind == V2 else "memory.oom_control")  # v1: memory first
        counts = dict(line.split() for line in events.read_text().splitlines())
        return int(counts.get("oom_kill", 0)) > 0

    def remove(self) -> None:
        """Kill what is left of the run, then remove its cgroup; raises OSError if that cannot be done in time."""
        for fd in self.join_fds:
            os.close(fd)
        self.join_fds = []
        deadline = time.monotonic() + _REMOVE_TIMEOUT_S
        while self.folders:
            folder = self.folders[-1]
            try:
                if (folder / "cgroup.kill").exists():
                    (folder / "cgroup.kill").write_text("1")
                for pid in (folder / "cgroup.procs").read_text().split():
                    _kill_if_inside(int(pid), folder.name)
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # EBUSY while its processes are still dying
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            self.folders.pop()

    def __enter__(self) -> SandboxCgroup:
        return self

    def __exit__(self, *_) -> None:
        self.remove()


def _kill_if_inside(pid: int, name: str) -> None:
    """SIGKILL pid if it is still a process of cgroup `name`: the pidfd pins it, so a reused pid is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            if any(line.endswith(f"/{name}") for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


# Joins as the launcher does in the rlimit fallback, where the program's uid writes: the hardest case.
_JOIN_PROBE = """
import os, sys
uid, fds = int(sys.argv[1]), sys.argv[2:]
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
for fd in fds:
    os.write(int(fd), b"0")
print(open("/proc/self/cgroup").read())
"""


@functools.cache
def available(probe_uid: int | None) -> tuple[str | None, tuple[Path, ...], str | None]:
    """(kind, parent folders, None) where a trial cgroup takes limits and a process (that switched to probe_uid, if
    given) can join it; else (None, (), why not)."""
    try:
        kind, parents = _parents()
        with SandboxCgroup(kind, parents, _PROBE_BYTES, 8) as trial:
            uid = -1 if probe_uid is None else probe_uid
            argv = [sys.executable, "-I", "-S", "-c", _JOIN_PROBE, str(uid), *map(str, trial.join_fds)]
            probe = subprocess.run(argv, pass_fds=trial.join_fds, capture_output=True, text=True, timeout=20)
            joined = [line for line in probe.stdout.splitlines() if line.endswith(f"/{trial.folders[0].name}")]
            if probe.returncode != 0 or len(joined) != len(trial.folders):
                raise OSError(f"a process cannot join its cgroup: {probe.stderr.strip()[-500:]}")
            trial.oom_killed()
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return None, (), f"{type(exc).__name__}: {exc}"
    return kind, parents, None
