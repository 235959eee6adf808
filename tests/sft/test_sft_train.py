"""`distill sft` end to end on CPU with real training: LoRA on the embedded SmolLM2, full fine-tuning of tiny random
Qwen2 and Llama students, each on a dataset made by `distill build`; the saved models reload in transformers and
generate through vLLM in-process; checkpoints resume; the distillation temperature follows its curve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.losses import temperature_at
from tests.conftest import ROOT
from tests.sft.conftest import tiny_student
from tests.sft.vllm_generate import PROMPT, RESULT

pytestmark = pytest.mark.slow


def distill_sft(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", "sft", "--config", "recipes/sft/demo-cpu.yaml", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def students(tmp_path_factory, arithmetic_dataset, embedded_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    common = ["--dataset", str(arithmetic_dataset), "--logging_steps", "1", "--save_steps", "5"]
    out = {"lora": root / "lora"}
    distill_sft(*common, "--output_dir", str(out["lora"]), "--max_steps", "10")
    for family in ("qwen2", "llama"):
        init = tiny_student(family, root / f"{family}-init", embedded_path)
        out[family] = root / family
        distill_sft(
            *common,
            *("--model_name_or_path", str(init), "--use_peft", "false", "--merge_lora", "false"),
            *("--learning_rate", "2e-3", "--max_steps", "15", "--output_dir", str(out[family])),
        )
    return out


@pytest.mark.parametrize("name", ["lora", "qwen2", "llama"])
def test_training_loss_falls_and_the_run_leaves_its_records(students, name):
    output = students[name]
    curve = losses(output)
    assert len(curve) >= 10
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.8 * first, f"{name}: loss {curve}"
    lint = json.loads((output / "sft_lint.json").read_text())
    assert lint["end_of_turn_token"] == "<|im_end|>" and lint["excluded"] == {}
    summary = json.loads((output / "distill_sft.json").read_text())
    assert summary["rows_trained"] == lint["rows_trained"] > 0
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.model_type == {"lora": "llama", "qwen2": "qwen2", "llama": "llama"}[name]


def test_lora_run_saves_the_adapter_and_a_merged_model_that_differs_from_the_base(students, embedded_path):
    output = students["lora"]
    assert (output / "adapter" / "adapter_config.json").exists()
    assert not (output / "adapter_config.json").exists(), "output_dir must hold the merged model, not the adapter"
    merged = AutoModelForCausalLM.from_pretrained(output).state_dict()
    base = AutoModelForCausalLM.from_pretrained(embedded_path).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name]), "the LoRA update was not merged"


def test_saved_students_generate_through_vllm_in_process(students):
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_CPU_KVCACHE_SPACE="1")
    folders = [str(students[n]) for n in ("lora", "qwen2", "llama")]
    done = subprocess.run(
        [sys.executable, "tests/sft/vllm_generate.py", *folders],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.removeprefix(RESULT) for line in done.stdout.splitlines() if line.startswith(RESULT)]
    results = {r["model"]: r for r in map(json.loads, lines)}
    assert set(results) == set(folders)
    assert all(r["tokens"] > 0 for r in results.values())
    # vLLM runs the trained weights: its greedy tokens match transformers' on the same folder.
    lora = str(students["lora"])
    tokenizer = AutoTokenizer.from_pretrained(lora)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(lora, dtype=torch.float32)
    greedy = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert results[lora]["text"].startswith(tokenizer.decode(greedy, skip_special_tokens=True).rstrip())


def test_a_second_run_resumes_from_the_last_checkpoint(tmp_path, arithmetic_dataset, tiny_qwen):
    args = ["--dataset", str(arithmetic_dataset), "--model_name_or_path", str(tiny_qwen), "--use_peft", "false"]
    args += ["--merge_lora", "false", "--output_dir", str(tmp_path / "out"), "--logging_steps", "1"]
    args += ["--save_steps", "3", "--save_total_limit", "3", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    distill_sft(*args, "--max_steps", "6")
    # A save cut short by a kill: the weights were written, trainer_state.json (written last) was not.
    torn = tmp_path / "out" / "checkpoint-8"
    torn.mkdir()
    shutil.copy(tmp_path / "out" / "checkpoint-6" / "model.safetensors", torn)
    second = distill_sft(*args, "--max_steps", "9")
    assert f"removing {torn}" in second.stderr
    assert "resuming from" in second.stderr and "checkpoint-6" in second.stderr
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == list(range(1, 10)), steps  # steps 1-6 from the first run, 7-9 from the second, none twice


def test_distillation_temperature_follows_its_schedule_during_training(tmp_path, arithmetic_dataset, tiny_qwen):
    steps = 8
    distill_sft(
        *("--dataset", str(arithmetic_dataset), "--model_name_or_path", str(tiny_qwen), "--use_peft", "false"),
        *("--merge_lora", "false", "--output_dir", str(tmp_path / "kd"), "--logging_steps", "1"),
        *("--teacher_model_name_or_path", "smollm2-135m-instruct", "--kd_temperature_schedule", "cosine"),
        *("--max_steps", str(steps), "--save_strategy", "no"),
    )
    history = json.loads((tmp_path / "kd" / "trainer_state.json").read_text())["log_history"]
    logged = [(h["step"], h["kd_temperature"], h["kd_loss"]) for h in history if "kd_temperature" in h]
    assert [s for s, _, _ in logged] == list(range(1, steps + 1))
    for step, temperature, kd in logged:  # step k computes its loss at global_step k - 1
        assert temperature == pytest.approx(temperature_at((step - 1) / steps, 5.0, 1.0, "cosine"), abs=1e-6)
        assert kd > 0


def test_two_processes_through_accelerate_write_each_record_once_and_train_like_one(
    tmp_path, arithmetic_dataset, tiny_qwen
):
    """`accelerate launch --multi_gpu --num_processes 2 -m pipeline.cli sft ... --use_cpu true`: two CPU processes
    meeting through gloo (`accelerate launch --cpu` starts one process unless mpirun is set up)."""
    args = ["--dataset", str(arithmetic_dataset), "--model_name_or_path", str(tiny_qwen), "--use_peft", "false"]
    args += ["--merge_lora", "false", "--logging_steps", "1", "--save_strategy", "no", "--max_steps", "3"]
    args += ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    args += ["--weight_decay", "0", "--max_grad_norm", "0", "--weighted_loss", "true", "--seed", "0"]
    args += ["--use_cpu", "true", "--dataloader_num_workers", "0", "--train_sampling_strategy", "sequential"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.cli"]
    cmd = [*launch, "sft", "--config", "recipes/sft/demo-cpu.yaml", *args, "--output_dir", str(tmp_path / "two")]
    cmd += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    two = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("distill sft: lint passed") == 1  # printed by the process that writes the records
    summary = json.loads((tmp_path / "two" / "distill_sft.json").read_text())
    assert summary["processes"] == 2
    assert len(list((tmp_path / "two" / ".tokenized").glob("tokenized-*.arrow"))) == 1  # tokenized once
    one = distill_sft(
        *args,
        "--output_dir",
        str(tmp_path / "one"),
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
    )
    assert json.loads((tmp_path / "one" / "distill_sft.json").read_text())["processes"] == 1
    assert one.stderr.count("distill sft: lint passed") == 1
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen).state_dict()
    moved = max((b[k] - start[k]).abs().max().item() for k in b)  # the largest change 3 steps made to a parameter
    difference = max((a[k] - b[k]).abs().max().item() for k in b)
    print(
        f"\n2 processes x 2 rows vs 1 process x 4 rows, 3 steps: largest difference {difference:.2e}, "
        f"largest change {moved:.2e}"
    )
    assert difference < 1e-4 * moved
