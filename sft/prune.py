"""`distill student init`: a student made of K decoder layers of its teacher.

A pruned teacher is a far better start for a distilled student than random weights: its embeddings, attention and MLP
weights already speak the teacher's language, and it shares the teacher's tokenizer, so logit distillation (KL over
the same vocabulary) works. Evenly spaced layers keep the first and the last layer, which matter most (ShortGPT,
Men et al., 2024). transformers loads and saves; we only cut the layer list and fix what depends on its length.

    distill student init --from smollm2-135m-instruct --layers 8 --output runs/students/smol-8
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.models import resolve_model

INFO_FILE = "distill_student.json"
STRATEGIES = ("even", "first")
# Config fields holding one entry per decoder layer (Qwen2 and most recent families: full or sliding attention).
PER_LAYER_FIELDS = ("layer_types",)
# Config fields that are a layer index: "layers below this one use full attention" (Qwen2's sliding window).
LAYER_INDEX_FIELDS = ("max_window_layers",)


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


def prune_layers(teacher: str | Path, layers: int, output: str | Path, strategy: str = "even") -> Path:
    """Save a copy of `teacher` with only `layers` decoder layers to `output` (a new or empty folder)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists and is not empty: choose a new output folder")
    resolved = resolve_model(str(teacher))
    config = AutoConfig.from_pretrained(resolved.path)
    total = config.num_hidden_layers
    keep = kept_layers(total, layers, strategy)  # before loading weights: a wrong K fails at once
    teacher_model = AutoModelForCausalLM.from_pretrained(resolved.path, config=config, dtype=torch.float32)
    model = drop_layers(teacher_model, keep)

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died before os.replace
    model.save_pretrained(tmp)  # safetensors (transformers 5 writes no other format), config, generation_config
    AutoTokenizer.from_pretrained(resolved.path).save_pretrained(tmp)
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
