"""What a model costs to serve: parameters, bytes on disk, KV cache per token, and peak memory while generating.

Parameters are counted from the safetensors headers (no weights loaded), so a 70B teacher is measured as cheaply as
a 135M student. Peak memory is what the engine adds to this process tree's resident memory (vLLM may run the model in
this process or in child processes, and `vllm-server` is a child), sampled by psutil from just before the engine
starts. On a GPU, vLLM reserves a fixed share of device memory up front: there the parameter and KV figures say more
about what a model needs than any measured peak.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import psutil
from safetensors import safe_open

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int | None:
    """Distinct stored tensors (tied embeddings count once); None when the folder holds no safetensors."""
    files = weight_files(folder)
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def size_on_disk(folder: Path) -> int | None:
    files = weight_files(folder)
    return sum(p.stat().st_size for p in files) if files else None


def kv_bytes_per_token(folder: Path, dtype: str) -> int | None:
    """Keys and values of every layer for one token: what the engine must hold per token of context."""
    config_path = folder / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
    layers = config.get("num_hidden_layers")
    if not (heads and head_dim and layers):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2)


class PeakMemory:
    """Peak resident memory of this process and its children above the level at entry, sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _resident() -> int:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._resident() - self._baseline)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._baseline = self._resident()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
