"""`vllm-server`: start vLLM's OpenAI server as a managed subprocess on localhost and talk to it as `openai`.

The server is started with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the CPU
build fails), in its own process group so that stopping it takes its engine workers too. It is stopped at the end,
on Ctrl-C, on SIGTERM and on error; if our process dies without cleanup (kill -9), the kernel's parent-death
signal stops it, so no orphan keeps the accelerator. Its engine settings are the in-process engine's on this
platform (`vllm_engine.engine_settings`), as command-line arguments.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from pipeline.generate.config import NO_KEY, TeacherConfig
from pipeline.generate.teacher.base import PROCESSED_LOGPROBS, vllm_env, vllm_version
from pipeline.generate.teacher.openai_client import OpenAITeacher
from pipeline.generate.teacher.vllm_engine import engine_settings
from pipeline.models import ResolvedModel

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cli_args(settings: dict[str, Any]) -> list[str]:
    """vllm.LLM keywords as api_server arguments: `--kebab-case VALUE`; a bool as `--flag`/`--no-flag` (vLLM's
    boolean options take both), a dict as JSON, a list as several values; None leaves vLLM's default."""
    args: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedVLLMServer:
    """A vLLM server on 127.0.0.1 for the lifetime of a `with` block."""

    def __init__(
        self,
        model: ResolvedModel,
        cfg: TeacherConfig,
        log_path: Path,
        seed: int | None = None,
        max_logprobs: int = 21,  # sampling.logprobs <= 20; teacher_topk K <= 20 asks K + 1 (openai_client._request)
        logprobs_mode: str = PROCESSED_LOGPROBS,
    ):
        """`logprobs_mode`: teacher.base.logprobs_mode of the run (raw_logprobs for sparse KD)."""
        self.model, self.cfg, self.log_path, self.seed = model, cfg, Path(log_path), seed
        self.logprobs_mode = logprobs_mode
        self.port = cfg.port or free_port()
        self.max_logprobs = max_logprobs
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self, on_cpu: bool | None = None) -> list[str]:
        """The server's command line: the in-process engine's settings on this platform (`engine_settings`; `on_cpu`
        overrides the detection), then the reasoning parser, the seed and `server_args`."""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model.path]
        cmd += ["--served-model-name", self.model.name, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--max-logprobs", str(self.max_logprobs)]
        cmd += cli_args(engine_settings(self.cfg, on_cpu, self.logprobs_mode))
        if self.cfg.reasoning_parser:
            cmd += ["--reasoning-parser", self.cfg.reasoning_parser]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        return cmd + list(self.cfg.server_args)

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=vllm_env(),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        try:
            return self._wait_healthy()
        except BaseException:  # Ctrl-C or a failed start must not leave a server behind
            self.stop()
            raise

    def _wait_healthy(self) -> str:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with code {self.process.returncode} while starting; "
                    f"its log {self.log_path} ends with:\n{self._log_tail()}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not healthy after {self.cfg.startup_timeout_s:.0f}s; log: {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after a grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ManagedVLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMServerTeacher(OpenAITeacher):
    """The `openai` backend pointed at a server this object starts and stops."""

    def __init__(
        self,
        model: ResolvedModel,
        cfg: TeacherConfig,
        log_path: Path,
        seed: int | None = None,
        logprobs_mode: str = PROCESSED_LOGPROBS,
    ):
        self.server = ManagedVLLMServer(model, cfg, log_path, seed=seed, logprobs_mode=logprobs_mode)
        url = self.server.start()
        # Our own server needs no key: the user's OPENAI_API_KEY is not sent to it (unless the recipe gives one).
        endpoints = {"endpoints": [url], "api_key": cfg.api_key or SecretStr(NO_KEY)}
        super().__init__(cfg.model_copy(update=endpoints), model.name, engine="vllm-server", send_seed=False)
        self.engine_version = vllm_version()

    def close(self) -> None:
        self.server.stop()
