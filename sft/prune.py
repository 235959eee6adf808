"""`distill student init`: a student made of K decoder layers of its teacher.

A pruned teacher is a far better start for a distilled student than random weights: its embeddings, attention and MLP
weights already speak the teacher's language, and it shares the teacher's tokenizer, so logit distillation (KL over
the same vocabulary) works. Evenly spaced layers keep the first and the last layer, which matter most (ShortGPT,
Men et al., 2024).

The student is written by copying bytes, never by loading the teacher: each kept tensor's bytes go from the
teacher's safetensors shards to the student's, renamed (`model.layers.{old}.` to `model.layers.{new}.`), through
one fixed buffer. So the student keeps the teacher's stored dtype (bf16 stays bf16: no float32 upcast, no rounding),
and memory does not grow with the model: a 70B teacher costs the same few hundred MB (the Python libraries) as the
135M embedded one, where loading it in float32 took about 280 GB. `safe_open` validates each teacher shard's header
(offsets, sizes, dtypes) before a byte is copied; reading the tensors through it instead would hold each whole
tensor in memory, plus its mmap'd pages, which for the embedded teacher (a 113 MB float32 embedding) is above
what the whole copy needs. The config gets only the fields that depend on the layer count changed.
`drop_layers` does the same to a loaded model in memory (the reference the tests compare against).

    distill student init --from smollm2-135m-instruct --layers 8 --output runs/students/smol-8
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from pipeline.models import ResolvedModel, resolve_model

INFO_FILE = "distill_student.json"
STRATEGIES = ("even", "first")
# Config fields holding one entry per decoder layer (Qwen2 and most recent families: full or sliding attention).
PER_LAYER_FIELDS = ("layer_types",)
# Config fields that are a layer index: "layers below this one use full attention" (Qwen2's sliding window).
LAYER_INDEX_FIELDS = ("max_window_layers",)
# transformers 4's default shard size: big enough for few files, small enough for a hub upload or a FAT-ish disk.
MAX_SHARD_BYTES = 5 * 10**9
COPY_BUFFER_BYTES = 8 * 2**20  # what one copy holds in memory, whatever the model's size
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Bytes per element, to order a shard's tensors widest first so that each starts aligned to its own element size.
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def kept_layers(total: int, keep: int, strategy: str = "even") -> list[int]:
    """Layer indices to keep, ascending: round(linspace(0, total-1, keep)) for "even", the first `keep` for "first"."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} decoder layers: choose 1..{total}")
    if strategy == "first":
        return list(range(keep))
    indices = [int(i) for i in np.round(np.linspace(0, total - 1, keep))]
    if len(set(indices)) != keep:  # cannot happen for keep <= total (the step is >= 1); guards the formula itself
        raise ValueError(f"evenly spaced layers {indices} of {total} are not distinct")
    return indices


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a Llama/Qwen2-style causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"cannot prune model type {model.config.model_type!r}: its decoder layers are not at model.model.layers "
            "(the Llama and Qwen2 families are supported)"
        )
    return layers


def _renumber_config(config, keep: list[int]) -> None:
    """Make every config field that depends on the layer count describe the kept layers."""
    fields = config.to_dict()
    config.num_hidden_layers = len(keep)
    for name in PER_LAYER_FIELDS:
        if fields.get(name) is not None:
            setattr(config, name, [fields[name][i] for i in keep])
    for name in LAYER_INDEX_FIELDS:
        if fields.get(name) is not None:
            setattr(config, name, sum(i < fields[name] for i in keep))


def drop_layers(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only the decoder layers at `keep` (ascending), in place, and renumber what depends on the layer count."""
    teacher_layers = _decoder_layers(model)
    model.model.layers = torch.nn.ModuleList(teacher_layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        # The KV cache is a list indexed by layer_idx: stale indices would read and write other layers' keys.
        for module in layer.modules():
            if "layer_idx" in vars(module):
                module.layer_idx = new_index
    _renumber_config(model.config, keep)
    return model


@dataclass(frozen=True)
class _Tensor:
    """One tensor to copy: its name in the student, and where its bytes lie in a teacher shard."""

    name: str
    dtype: str  # safetensors' name for it ("BF16", "F32", ...)
    shape: tuple[int, ...]
    source: Path
    start: int  # absolute byte offset in `source`
    nbytes: int


def teacher_folder(resolved: ResolvedModel) -> Path:
    """The local folder of a teacher: itself, or a hub name's snapshot in the local Hugging Face cache (no network)."""
    if Path(resolved.path).is_dir():
        return Path(resolved.path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = None if resolved.revision == "unknown" else resolved.revision
    try:
        return Path(snapshot_download(resolved.path, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as error:
        raise FileNotFoundError(
            f"teacher {resolved.name!r} is neither a folder nor in the local Hugging Face cache: download it first"
            f" (hf download {resolved.path}) or pass its folder ({error})"
        ) from error


def _teacher_shards(folder: Path) -> list[Path]:
    """The teacher's safetensors files: those the index names, or the single file."""
    index = folder / INDEX_FILE
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())  # first-seen order, unique
        shards = [folder / name for name in names]
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(missing)}")
        return shards
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(
        f"teacher folder {folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}): student init copies"
        " tensors from safetensors shards; convert other formats first (from_pretrained, then save_pretrained)"
    )


def _shard_tensors(path: Path) -> list[_Tensor]:
    """Every tensor of one safetensors file with its absolute byte range; `safe_open` vouches for the header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    with safe_open(path, framework="pt") as checked:  # validates offsets against sizes and the file; reads no data
        names = checked.keys()  # a list: safe_open is not iterable
        if set(names) != set(header):
            raise ValueError(f"{path}: safetensors header disagrees with safetensors' own reading of it")
        for name in names:
            view = checked.get_slice(name)
            if (view.get_dtype(), list(view.get_shape())) != (header[name]["dtype"], header[name]["shape"]):
                raise ValueError(f"{path}: tensor {name} header disagrees with safetensors' own reading of it")
    return [
        _Tensor(name, entry["dtype"], tuple(entry["shape"]), path, 8 + length + begin, end - begin)
        for name, entry in header.items()
        for begin, end in [entry["data_offsets"]]
    ]


def _natural_key(name: str) -> list:
    """model.layers.2 before model.layers.10: shards then hold whole layers in order, as save_pretrained's do."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_student(folder: Path, config, keep: list[int]) -> list[_Tensor]:
    """The student's tensors: the non-layer ones and the kept layers', renamed, in the teacher's stored dtype.

    Left out, as save_pretrained of the loaded model leaves them out: a tied `lm_head.weight` (the embedding is the
    head) and `rotary_emb.inv_freq` buffers that some old checkpoints stored (transformers recomputes them).
    """
    tensors: dict[str, _Tensor] = {}
    for shard in _teacher_shards(folder):
        for tensor in _shard_tensors(shard):
            if tensor.name in tensors:
                raise ValueError(f"tensor {tensor.name} is in both {tensors[tensor.name].source} and {shard}")
            tensors[tensor.name] = tensor
    layers = sorted({int(m.group(1)) for name in tensors if (m := _LAYER.fullmatch(name))})
    if not layers:
        raise ValueError(
            f"cannot prune model type {config.model_type!r}: its decoder layers are not at model.model.layers "
            "(no tensor is named model.layers.N.*; the Llama and Qwen2 families are supported)"
        )
    if layers != list(range(config.num_hidden_layers)):
        raise ValueError(
            f"{folder}: config.json says {config.num_hidden_layers} decoder layers but the weights hold layers"
            f" {layers[0]}..{layers[-1]} ({len(layers)} of them): the folder mixes two models"
        )
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "model.embed_tokens.weight" in tensors
    new_index = {old: new for new, old in enumerate(keep)}
    plan = []
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        if match := _LAYER.fullmatch(name):
            old = int(match.group(1))
            if old not in new_index:
                continue
            tensor = _Tensor(**{**vars(tensor), "name": f"model.layers.{new_index[old]}.{match.group(2)}"})
        plan.append(tensor)
    return sorted(plan, key=lambda t: _natural_key(t.name))


def split_shards(tensors: list[_Tensor], max_shard_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors, at most `max_shard_bytes` of data per shard; a bigger tensor gets a shard of its own."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _copy(source: BinaryIO, start: int, nbytes: int, out: BinaryIO, buffer: memoryview) -> None:
    source.seek(start)
    while nbytes:
        got = source.readinto(buffer[: min(nbytes, len(buffer))])
        if not got:
            raise ValueError(f"{source.name} ends before its safetensors header says: the file is truncated")
        out.write(buffer[:got])
        nbytes -= got


def write_shard(path: Path, tensors: list[_Tensor], sources: dict[Path, BinaryIO], buffer: memoryview) -> None:
    """A safetensors file written as it is read: header first (it needs only names, dtypes, shapes), then bytes.

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header padded with spaces to a
    multiple of 8, then the tensors back to back, widest element first so that every tensor starts aligned.
    """
    ordered = sorted(tensors, key=lambda t: (-_ITEMSIZE.get(t.dtype, 1), t.name))
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without format "pt"
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for tensor in ordered:
            _copy(sources[tensor.source], tensor.start, tensor.nbytes, out, buffer)


def write_weights(folder: Path, tensors: list[_Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The student's safetensors: one model.safetensors, or numbered shards and their index as transformers names
    them. Returns the file names."""
    shards = split_shards(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    buffer = memoryview(bytearray(COPY_BUFFER_BYTES))
    with ExitStack() as stack:
        sources = {p: stack.enter_context(open(p, "rb", buffering=0)) for p in {t.source for t in tensors}}
        for name, shard in zip(names, shards, strict=True):
            write_shard(folder / name, shard, sources, buffer)
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(int(np.prod(t.shape)) for t in tensors),
                "total_size": sum(t.nbytes for t in tensors),
            },
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def prune_layers(
    teacher: str | Path,
    layers: int,
    output: str | Path,
    strategy: str = "even",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Save a copy of `teacher` with only `layers` decoder layers to `output` (a new or empty folder)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty: choose a new output folder")
    resolved = resolve_model(str(teacher))
    folder = teacher_folder(resolved)
    config = AutoConfig.from_pretrained(folder)
    total = config.num_hidden_layers
    keep = kept_layers(total, layers, strategy)  # before reading weights: a wrong K fails at once
    tensors = plan_student(folder, config, keep)  # an unsupported layout fails before anything is written
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the one from_pretrained derives from config.json, and saves
        generation = GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)
    _renumber_config(config, keep)

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died before os.replace
    tmp.mkdir(parents=True)
    write_weights(tmp, tensors, max_shard_bytes)
    config.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    info = {
        "teacher": str(teacher),
        "teacher_path": resolved.path,
        "teacher_revision": resolved.revision,
        "teacher_layers": total,
        "kept_layers": keep,
        "strategy": strategy,
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if output.exists():
        output.rmdir()  # empty, checked above
    os.replace(tmp, output)
    return output
