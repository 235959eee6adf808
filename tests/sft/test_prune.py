"""`distill student init` (sft/prune.py): layer pruning of the embedded SmolLM2 (Llama, 30 layers) and of a tiny
randomly initialized Qwen2 whose config lists per-layer attention types."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM as LM
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pipeline.models import EMBEDDED_ALIAS
from sft.prune import drop_layers, kept_layers, prune_layers
from tests.sft.conftest import tiny_student

QWEN_TYPES = ["full_attention"] * 3 + ["sliding_attention"] * 3  # max_window_layers=3 of 6


def expected_even(total: int, keep: int) -> list[int]:
    return [int(i) for i in np.round(np.linspace(0, total - 1, keep))]


@pytest.fixture(scope="module")
def six_layer_qwen(tmp_path_factory, embedded_path) -> Path:
    """6 layers, 2 heads of head_dim 64, the SmolLM2 tokenizer, full attention below layer 3 and sliding above."""
    torch.manual_seed(0)
    return tiny_student(
        "qwen2",
        tmp_path_factory.mktemp("tiny-qwen2"),
        embedded_path,
        num_hidden_layers=6,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=3,
        layer_types=QWEN_TYPES,
    )


@pytest.fixture(scope="module")
def pruned_smollm(tmp_path_factory) -> Path:
    return prune_layers(EMBEDDED_ALIAS, 8, tmp_path_factory.mktemp("pruned") / "smol-8")


def cached_and_uncached_greedy(model, tokenizer, prompt: str, new_tokens: int = 5) -> tuple[list[int], list[int]]:
    """Greedy tokens from `generate` with the KV cache, and from one full forward pass per token without it."""
    batch = tokenizer(prompt, return_tensors="pt")
    n = batch.input_ids.shape[1]
    out = model.generate(
        **batch, max_new_tokens=new_tokens, do_sample=False, use_cache=True, return_dict_in_generate=True
    )
    assert len(out.past_key_values.layers) == model.config.num_hidden_layers
    ids = batch.input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return out.sequences[0, n:].tolist(), ids[0, n:].tolist()


@pytest.mark.parametrize(("total", "keep"), [(30, 8), (30, 2), (30, 29), (30, 30), (6, 3), (8, 7), (5, 1)])
def test_even_layers_are_rounded_linspace_and_keep_both_ends(total, keep):
    layers = kept_layers(total, keep)
    assert layers == expected_even(total, keep)
    assert layers[0] == 0 and (keep == 1 or layers[-1] == total - 1)
    assert layers == sorted(set(layers)) and len(layers) == keep


def test_30_to_8_even_layers_spelled_out_and_first_strategy():
    assert kept_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert kept_layers(30, 8, "first") == list(range(8))
    assert kept_layers(6, 6, "first") == list(range(6))


@pytest.mark.parametrize(("keep", "strategy", "message"), [(0, "even", r"choose 1\.\.6"), (7, "first", r"1\.\.6")])
def test_a_layer_count_outside_1_to_L_is_refused_before_writing(six_layer_qwen, tmp_path, keep, strategy, message):
    with pytest.raises(ValueError, match=message):
        prune_layers(six_layer_qwen, keep, tmp_path / "out", strategy=strategy)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_strategy_is_refused(six_layer_qwen, tmp_path):
    with pytest.raises(ValueError, match="unknown pruning strategy 'last'"):
        prune_layers(six_layer_qwen, 2, tmp_path / "out", strategy="last")


def test_an_existing_non_empty_output_folder_is_refused_and_left_alone(six_layer_qwen, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prune_layers(six_layer_qwen, 2, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_a_model_without_model_layers_is_refused_by_type(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"model type 'gpt2'.*model\.model\.layers"):
        prune_layers(tmp_path / "gpt2", 1, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_pruned_smollm_reloads_with_the_teachers_weights_at_the_kept_layers(pruned_smollm, embedded_path):
    keep = expected_even(30, 8)
    info = json.loads((pruned_smollm / "distill_student.json").read_text())
    assert info["teacher"] == EMBEDDED_ALIAS and info["teacher_layers"] == 30
    assert info["kept_layers"] == keep and info["strategy"] == "even"
    assert (pruned_smollm / "model.safetensors").exists() and (pruned_smollm / "generation_config.json").exists()
    assert not pruned_smollm.with_name("smol-8.tmp").exists()

    student = LM.from_pretrained(pruned_smollm, dtype=torch.float32)
    teacher = LM.from_pretrained(embedded_path, dtype=torch.float32)
    assert student.config.num_hidden_layers == 8 == len(student.model.layers)
    s, t = student.state_dict(), teacher.state_dict()
    assert len(s) == len(t) - 22 * len([k for k in t if k.startswith("model.layers.0.")])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name]), name
    for new, old in enumerate(keep):
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "input_layernorm"):
            assert torch.equal(s[f"model.layers.{new}.{part}.weight"], t[f"model.layers.{old}.{part}.weight"]), (
                new,
                old,
            )
    template = AutoTokenizer.from_pretrained(embedded_path).chat_template
    assert template and AutoTokenizer.from_pretrained(pruned_smollm).chat_template == template


def test_pruned_smollm_generates_with_the_kv_cache_as_without_it(pruned_smollm):
    student = LM.from_pretrained(pruned_smollm, dtype=torch.float32).eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(8))
    cached, uncached = cached_and_uncached_greedy(student, AutoTokenizer.from_pretrained(pruned_smollm), "2 + 3 =")
    assert len(cached) == 5 and cached == uncached


def test_qwen2_keeps_the_per_layer_types_of_the_kept_layers(six_layer_qwen, tmp_path):
    (tmp_path / "q3").mkdir()  # an empty folder is fine: nothing of the user's is replaced
    out = prune_layers(six_layer_qwen, 3, tmp_path / "q3")
    keep = expected_even(6, 3)
    assert keep == [0, 2, 5]
    student = LM.from_pretrained(out, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 3 == len(student.model.layers)
    assert (
        student.config.layer_types == [QWEN_TYPES[i] for i in keep] == [*["full_attention"] * 2, "sliding_attention"]
    )
    assert student.config.max_window_layers == 2  # still "the first layers that use full attention"
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    teacher = LM.from_pretrained(six_layer_qwen, dtype=torch.float32)
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[5].mlp.up_proj.weight)
    cached, uncached = cached_and_uncached_greedy(student, AutoTokenizer.from_pretrained(out), "Hello there")
    assert cached == uncached


def test_dropped_layers_are_renumbered_in_memory_so_generate_uses_a_consistent_cache(six_layer_qwen):
    model = drop_layers(LM.from_pretrained(six_layer_qwen, dtype=torch.float32).eval(), [1, 3, 4])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert model.config.layer_types == [QWEN_TYPES[i] for i in (1, 3, 4)] and model.config.max_window_layers == 1
    cached, uncached = cached_and_uncached_greedy(model, AutoTokenizer.from_pretrained(six_layer_qwen), "Hello there")
    assert cached == uncached
