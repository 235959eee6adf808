"""`distill student init` (sft/prune.py): layer pruning of the embedded SmolLM2 (Llama, 30 layers) and of tiny
randomly initialized Qwen2 and Llama teachers (per-layer attention types, bf16 shards, tied and untied heads), each
checked against the reference: the teacher loaded in float32, `drop_layers`, save_pretrained (the code before
student init copied tensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM as LM
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from pipeline.models import EMBEDDED_ALIAS
from sft.prune import INDEX_FILE, _Tensor, drop_layers, kept_layers, prune_layers, split_shards, write_shard
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


# --- the copy against the reference: teacher loaded in float32, drop_layers, save_pretrained ---


def reference_prune(teacher: str | Path, keep: list[int], output: Path) -> Path:
    """What student init did before it copied tensors (and the way any reader would prune by hand)."""
    model = drop_layers(LM.from_pretrained(teacher, dtype=torch.float32), keep)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(output)
    return output


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files, as stored (dtype included)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert name not in tensors, name
                tensors[name] = f.get_tensor(name)
    return tensors


def prompt_logits(folder: Path, prompt: str = "The capital of France is") -> torch.Tensor:
    model = LM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")).logits


def config_fields(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_same_student(new: Path, reference: Path, stored_dtype: torch.dtype) -> None:
    """Tensor for tensor equal (the copy cast to float32: the reference upcast the teacher), same config fields
    apart from the dtype the weights are stored in, same generation config, same logits."""
    ours, theirs = saved_tensors(new), saved_tensors(reference)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == stored_dtype, name
        assert theirs[name].dtype == torch.float32, name
        assert torch.equal(tensor.float(), theirs[name]), name
    ours_config, theirs_config = config_fields(new), config_fields(reference)
    assert ours_config.pop("dtype") == str(stored_dtype).removeprefix("torch.")
    assert theirs_config.pop("dtype") == "float32"
    assert ours_config == theirs_config
    generation = "generation_config.json"
    assert json.loads((new / generation).read_text()) == json.loads((reference / generation).read_text())
    assert torch.equal(prompt_logits(new), prompt_logits(reference))


def test_the_embedded_teacher_is_stored_in_float32_and_its_student_is_todays_byte_for_byte(
    pruned_smollm, embedded_path, tmp_path
):
    assert {t.dtype for t in saved_tensors(Path(embedded_path)).values()} == {torch.float32}  # GGUF dequantized
    reference = reference_prune(embedded_path, expected_even(30, 8), tmp_path / "reference")
    assert_same_student(pruned_smollm, reference, torch.float32)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (pruned_smollm / name).read_bytes() == (reference / name).read_bytes(), name


def bf16_sharded_teacher(folder: Path, family: str, tied: bool, tokenizer_path: str) -> Path:
    """A 6-layer random teacher (tests/sft/conftest.py's tiny student) saved in bf16 over several safetensors files
    and their index."""
    extra = dict(use_sliding_window=True, sliding_window=16, max_window_layers=3, layer_types=QWEN_TYPES)
    torch.manual_seed(1)
    made = tiny_student(
        family,
        folder.with_name(folder.name + "-float32"),
        tokenizer_path,
        num_hidden_layers=6,
        tie_word_embeddings=tied,
        **(extra if family == "qwen2" else {}),
    )
    LM.from_pretrained(made, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(made).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("family", "tied"), [("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False)])
def test_a_bf16_sharded_teacher_gives_a_bf16_student_equal_to_the_float32_reference(
    family, tied, tmp_path, embedded_path
):
    teacher = bf16_sharded_teacher(tmp_path / "teacher", family, tied, embedded_path)
    teacher_files = json.loads((teacher / INDEX_FILE).read_text())["weight_map"]
    assert len(set(teacher_files.values())) >= 3 and ("lm_head.weight" in teacher_files) != tied
    max_shard = 500_000
    student = prune_layers(teacher, 3, tmp_path / "student", max_shard_bytes=max_shard)
    assert_same_student(student, reference_prune(teacher, [0, 2, 5], tmp_path / "reference"), torch.bfloat16)

    config = config_fields(student)
    assert config["num_hidden_layers"] == 3
    if family == "qwen2":
        assert config["layer_types"] == ["full_attention", "full_attention", "sliding_attention"]
        assert config["max_window_layers"] == 2
    teacher_tensors = saved_tensors(teacher)
    ours = saved_tensors(student)
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"], teacher_tensors["model.layers.5.mlp.up_proj.weight"])
    assert ("lm_head.weight" in ours) != tied

    index = json.loads((student / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(ours)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ours.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in ours.values())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        data = sum(ours[n].numel() * 2 for n in names)
        assert data <= max_shard or len(names) == 1, (shard, data)  # the 12.6 MB embedding gets a shard alone


def test_a_shard_is_written_widest_dtype_first_at_hand_computed_offsets(tmp_path):
    source = tmp_path / "source.safetensors"
    values = {
        "b": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),  # 6 bytes
        "a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # float32, 16 bytes
        "c": torch.tensor([7, 8, 9], dtype=torch.int64),  # 24 bytes
    }
    save_file(values, source)
    with open(source, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    tensors = [
        _Tensor(f"x.{name}", e["dtype"], tuple(e["shape"]), source, 8 + length + e["data_offsets"][0], size)
        for name, e in header.items()
        if name != "__metadata__"
        for size in [e["data_offsets"][1] - e["data_offsets"][0]]
    ]
    out = tmp_path / "out.safetensors"
    with open(source, "rb", buffering=0) as f:
        write_shard(out, tensors, {source: f}, memoryview(bytearray(5)))  # a 5-byte buffer: copies in pieces
    with open(out, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        written = json.loads(f.read(length))
    assert length % 8 == 0 and written["__metadata__"] == {"format": "pt"}
    assert [written[f"x.{n}"]["data_offsets"] for n in "cab"] == [[0, 24], [24, 40], [40, 46]]
    assert out.stat().st_size == 8 + length + 46
    with safe_open(out, framework="pt") as f:
        for name, value in values.items():
            assert f.get_tensor(f"x.{name}").dtype == value.dtype and torch.equal(f.get_tensor(f"x.{name}"), value)


def test_shards_hold_consecutive_tensors_up_to_the_bound_and_a_bigger_tensor_alone():
    tensors = [_Tensor(str(i), "U8", (n,), Path("t"), 0, n) for i, n in enumerate([5, 3, 3, 9, 1, 2, 6])]
    shards = split_shards(tensors, 6)
    assert [[t.nbytes for t in shard] for shard in shards] == [[5], [3, 3], [9], [1, 2], [6]]


def test_a_folder_without_safetensors_weights_is_refused_by_name(six_layer_qwen, tmp_path):
    (tmp_path / "bin").mkdir()
    shutil.copy(six_layer_qwen / "config.json", tmp_path / "bin" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights \(model\.safetensors or model\.safetensors"):
        prune_layers(tmp_path / "bin", 2, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_a_config_that_disagrees_with_the_weights_layer_count_is_refused(tmp_path, embedded_path):
    teacher = tiny_student("llama", tmp_path / "llama", embedded_path)  # 2 layers
    config = config_fields(teacher) | {"num_hidden_layers": 3}
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"says 3 decoder layers but the weights hold layers 0\.\.1 \(2 of them\)"):
        prune_layers(teacher, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_a_hub_name_is_read_from_the_local_hugging_face_cache_only(six_layer_qwen, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-qwen"
    shutil.copytree(six_layer_qwen, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = prune_layers("org/tiny-qwen", 2, tmp_path / "out")
    ours, teacher = saved_tensors(out), saved_tensors(six_layer_qwen)
    q_proj = "self_attn.q_proj.weight"
    assert torch.equal(ours[f"model.layers.1.{q_proj}"], teacher[f"model.layers.5.{q_proj}"])
    assert json.loads((out / "distill_student.json").read_text())["teacher"] == "org/tiny-qwen"
    with pytest.raises(FileNotFoundError, match="neither a folder nor in the local Hugging Face cache"):
        prune_layers("org/absent", 2, tmp_path / "out2")


def test_a_tied_head_and_rotary_buffers_stored_anyway_are_left_out_as_save_pretrained_leaves_them(
    tmp_path, embedded_path
):
    teacher = tiny_student("llama", tmp_path / "llama", embedded_path)  # 2 layers, tied head
    tensors = saved_tensors(teacher)
    assert "lm_head.weight" not in tensors
    extra = {
        "lm_head.weight": tensors["model.embed_tokens.weight"].clone(),  # as some hub checkpoints store it
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32),  # as old Llama conversions stored it
    }
    save_file(tensors | extra, teacher / "model.safetensors", metadata={"format": "pt"})
    out = prune_layers(teacher, 1, tmp_path / "out")
    assert sorted(saved_tensors(out)) == sorted(n for n in tensors if not n.startswith("model.layers.1."))


def test_a_teacher_without_a_generation_config_gets_the_one_from_pretrained_derives(tmp_path, embedded_path):
    teacher = tiny_student("llama", tmp_path / "llama", embedded_path)
    (teacher / "generation_config.json").unlink()
    ours = prune_layers(teacher, 1, tmp_path / "ours")
    generation = json.loads((ours / "generation_config.json").read_text())
    reference = reference_prune(teacher, [0], tmp_path / "reference")
    assert generation == json.loads((reference / "generation_config.json").read_text())
    assert generation["eos_token_id"] == AutoTokenizer.from_pretrained(embedded_path).eos_token_id
