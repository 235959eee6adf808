"""`distill student init`: a student made of K decoder layers of its teacher.

A pruned teacher is a far better start for a distilled student than random weights (its embeddings, attention and
MLP weights already speak the teacher's language), and it shares the teacher's tokenizer, so logit distillation
works. Evenly spaced layers keep the first and the last layer, which matter most (ShortGPT, Men et al., 2024).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import resolve_model

INFO_FILE = "distill_student.json"


def kept_layers(total: int, keep: int, strategy: str = "even") -> list[int]:
    """Indices of the layers to keep, ascending: evenly spaced with both ends, or the first `keep`."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} decoder layers: choose 1..{total}")
    if strategy == "first":
        return list(range(keep))
    if strategy != "even":
        raise ValueError(f"unknown pruning strategy {strategy!r}: even or first")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def prune_layers(teacher: str | Path, layers: int, output: str | Path, strategy: str = "even") -> Path:
    """Save a copy of `teacher` with only `layers` decoder layers to `output` (which must not exist yet)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} already exists and is not empty: choose a new folder")
    path = resolve_model(str(teacher)).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    decoder = model.get_decoder()
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise ValueError(f"model type {model.config.model_type} has no decoder `layers` list to prune")
    total = len(decoder.layers)
    keep = kept_layers(total, layers, strategy)
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in keep)
    for new_index, layer in enumerate(decoder.layers):  # the KV cache is indexed by these
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds (Qwen2 sliding window, ...)
        model.config.layer_types = [model.config.layer_types[i] for i in keep]

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    info = {"teacher": str(teacher), "teacher_path": path, "teacher_layers": total, "kept_layers": keep}
    (tmp / INFO_FILE).write_text(json.dumps({**info, "strategy": strategy}, indent=2) + "\n")
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    return output
