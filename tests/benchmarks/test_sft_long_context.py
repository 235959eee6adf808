"""benchmarks/sft_long_context.py, the GPU benchmark of issue 14, checked on the CPU: its FLOPs count against hand
arithmetic, its rows against the real tokenization path, and one smoke run of both loss paths."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Config

from sft.data import load_split, tokenize_split

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sft_long_context", ROOT / "benchmarks" / "sft_long_context.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["sft_long_context"] = bench
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return AutoTokenizer.from_pretrained(embedded_model.path)


def test_qwen2_1_5b_config_counts_and_flops_by_hand():
    config = Qwen2Config.from_json_file(str(bench.CONFIG_1_5B))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (1536, 28, 151936)
    assert config.tie_word_embeddings and config.num_key_value_heads == 2
    counts = bench.param_counts(config)
    # per layer: q 1536*1536+1536, k and v 1536*256+256 each, o 1536*1536, MLP 3*1536*8960, norms 2*1536
    per_layer = 2_360_832 + 2 * 393_472 + 2_359_296 + 41_287_680 + 3_072
    assert per_layer == 46_797_824
    assert counts.non_embedding == 28 * per_layer + 1536 == 1_310_340_608  # Qwen2.5-1.5B: 1.31B non-embedding
    assert counts.embedding == counts.lm_head == 233_373_696
    flops = bench.flops_per_token(config, 32768)
    assert flops["dense"] == 6 * 1_543_714_304 == 9_262_285_824
    assert flops["attention"] == 12 * 28 * 1536 * 32768 == 16_911_433_728
    assert flops["total"] == 26_173_719_552


def test_smoke_student_has_the_counted_parameters(tmp_path, tokenizer):
    config = bench.student_config(True, tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id  # Qwen's 151645 means nothing to this tokenizer
    import torch

    params = bench.build_student(config, tokenizer, tmp_path / "student", torch.float32, "cpu")
    # 2 layers of (64*64+64) + 2*(64*32+32) + 64*64 + 3*64*128 + 2*64 = 37,120, a final norm of 64, 151,936 x 64
    assert params == 2 * 37_120 + 64 + 151_936 * 64 == 9_798_208
    assert (tmp_path / "student" / "config.json").exists() and (tmp_path / "student" / "tokenizer.json").exists()


@pytest.mark.parametrize("length", [200, 257, 1000])
def test_rows_have_the_target_length_in_the_training_path(tmp_path, tokenizer, length):
    lengths = bench.write_dataset(tmp_path / "ds", tokenizer, length, rows=2)
    split = tokenize_split(load_split(str(tmp_path / "ds")), tokenizer, max_length=length, weighted=True)
    assert split.excluded == []
    assert split.rows["length"] == lengths
    assert all(length - 2 <= n <= length for n in lengths), lengths  # " a" fillers close any gap of one token


def test_longest_fit_and_table_read_oom_rows():
    results = [
        {"loss": "ours", "length": 8192, "status": "ok", "tokens_per_s": 1000.0, "mfu": 0.4, "peak_gb": 20.0,
         "peak_reserved_gb": 22.0, "losses": [12.0, 11.9]},
        {"loss": "ours", "length": 16384, "status": "ok", "tokens_per_s": 900.0, "mfu": 0.41, "peak_gb": 30.0,
         "peak_reserved_gb": 31.0, "losses": [12.0]},
        {"loss": "trl", "length": 8192, "status": "ok", "tokens_per_s": 800.0, "mfu": None, "peak_gb": None,
         "peak_reserved_gb": None, "losses": []},
        {"loss": "trl", "length": 16384, "status": "OOM"},
        {"loss": "trl", "length": 32768, "status": "not_run", "reason": "16384 did not fit"},
        {"loss": "trl-liger", "length": 8192, "status": "skipped", "reason": "liger-kernel not installed"},
    ]  # fmt: skip
    assert bench.longest_fit(results) == {"ours": 16384, "trl": 8192}
    lines = bench.table(results).splitlines()
    assert lines[1].split() == ["ours", "8192", "1000", "40.0%", "20.0", "22.0", "12.000/11.900"]
    assert lines[4].split() == ["trl", "16384", "OOM"]
    assert "not run: 16384 did not fit" in lines[5]


def test_smoke_run_both_loss_paths_agree(tmp_path):
    """One `distill sft` child per loss path on 256-token rows: the same first-step loss (batch 1, weight 1: our
    weighted mean is TRL's token mean), tokens/s measured, no GPU figures on the CPU."""
    out = tmp_path / "result.json"
    rc = bench.main(
        ["--smoke", "--lengths", "256", "--losses", "ours,trl", "--workdir", str(tmp_path), "--out", str(out)]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    ours, trl = ({r["loss"]: r for r in report["results"]}[k] for k in ("ours", "trl"))
    assert ours["status"] == trl["status"] == "ok"
    assert ours["losses"][0] == pytest.approx(trl["losses"][0], rel=1e-4)
    assert ours["losses"][0] == pytest.approx(11.93, abs=0.1)  # a random student: about ln(151,936) = 11.93
    rows = report["row_tokens"]["256"]
    assert all(254 <= n <= 256 for n in rows)
    # the timed step is the second row (sft.lint's own collation of the rows is not counted)
    assert ours["timed_steps"] == 1 and ours["timed_tokens"] in rows and ours["tokens_per_s"] > 0
    assert ours["mean_row_tokens"] == pytest.approx(sum(rows) / len(rows))
    assert ours["peak_gb"] is None and ours["mfu"] is None
    assert report["longest_fit"] == {"ours": 256, "trl": 256}
