"""Model folders and their revision: what marks rows of two different teachers (or students) apart."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
from safetensors.numpy import save_file

from pipeline.models import resolve_model


def _save(folder, seed: int) -> None:
    """A model folder as `save_pretrained` writes it: same config and tensor shapes whatever the training did."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    rng = np.random.default_rng(seed)
    save_file({"embed.weight": rng.standard_normal((16, 8)).astype(np.float32)}, str(folder / "model.safetensors"))
    time.sleep(0.05)  # a retrain takes longer than the file system's timestamp granularity


def test_retrained_weights_in_the_same_folder_are_another_revision(tmp_path):
    model = tmp_path / "teacher"
    _save(model, seed=0)
    first = resolve_model(str(model)).revision
    assert resolve_model(str(model)).revision == first  # nothing changed: same revision
    _save(model, seed=1)  # retrained: config.json, names, shapes and sizes all equal
    assert resolve_model(str(model)).revision != first


def test_a_checkpoint_written_inside_the_folder_is_not_the_model(tmp_path):
    model = tmp_path / "student"
    _save(model, seed=0)
    first = resolve_model(str(model)).revision
    (model / "checkpoint-4").mkdir()
    shutil.copy(model / "model.safetensors", model / "checkpoint-4" / "model.safetensors")
    assert resolve_model(str(model)).revision == first
