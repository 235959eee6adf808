"""`distill student init`: layer pruning of the embedded SmolLM2 and of a tiny Qwen2 (which lists per-layer types)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main as distill_main
from sft.prune import kept_layers, prune_layers


def test_layer_choice():
    assert kept_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]  # round(i * 29 / 7)
    assert kept_layers(30, 8, "first") == list(range(8))
    assert kept_layers(5, 5) == [0, 1, 2, 3, 4] and kept_layers(5, 1) == [0] and kept_layers(5, 2) == [0, 4]
    for bad in (0, 31):
        with pytest.raises(ValueError, match=r"choose 1\.\.30"):
            kept_layers(30, bad)


@pytest.fixture(scope="module")
def pruned_smollm(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "smol-8"
    assert (
        distill_main(["student", "init", "--from", "smollm2-135m-instruct", "--layers", "8", "--output", str(out)])
        == 0
    )
    return out


def test_pruned_student_keeps_the_teachers_layers_and_generates_with_a_kv_cache(pruned_smollm, embedded_path):
    student = AutoModelForCausalLM.from_pretrained(pruned_smollm, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    keep = json.loads((pruned_smollm / "distill_student.json").read_text())["kept_layers"]
    assert keep == kept_layers(30, 8) and student.config.num_hidden_layers == 8 == len(student.model.layers)
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    for new, old in enumerate(keep):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(s[name.format(new)], t[name.format(old)])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(8))
    tokenizer = AutoTokenizer.from_pretrained(pruned_smollm)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    cached = student.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)[0, ids.shape[1] :]
    uncached = ids
    with torch.no_grad():
        for _ in range(5):  # greedy without a cache, one full forward per token
            uncached = torch.cat([uncached, student(uncached).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == uncached[0, ids.shape[1] :].tolist()


def test_qwen2_per_layer_types_follow_the_kept_layers(tiny_qwen, tmp_path):
    out = prune_layers(tiny_qwen, 1, tmp_path / "q1", strategy="first")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and len(model.config.layer_types) == 1


def test_an_existing_output_folder_is_refused(tiny_qwen, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prune_layers(tiny_qwen, 1, tmp_path / "taken")
