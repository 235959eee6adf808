"""The sample weights of `distill sft` over a whole optimizer step: one real step of DistillSFTTrainer (plain SGD)
gives the same parameters however the step's samples are split into micro-batches, accumulation steps and processes,
a sample of weight 2 counts as that sample twice, and the update equals the one computed by hand with autograd."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.data import tokenize_split
from tests.conftest import ROOT
from tests.sft.conftest import conversation_rows, tiny_student
from tests.sft.one_step import LEARNING_RATE, one_step

PAIRS = [
    ("What is 17 + 25? Put the final answer in \\boxed{}.", "<think>\n17 + 25 = 42.\n</think>\n\n\\boxed{42}"),
    ("What is 2 + 2?", "<think>\nTwo and two make four, so the sum is 4.\n</think>\n\nThe answer is \\boxed{4}."),
]
WEIGHTS = [3.0, 1.0]
TOLERANCE = 1e-5


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| of a parameter tensor over the largest |b| of that tensor, over all tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)).item() for k in a)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, embedded_path):
    return tiny_student("llama", tmp_path_factory.mktemp("tiny-teacher"), embedded_path)


@pytest.fixture(scope="module")
def initial(tiny_qwen):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_qwen).state_dict().items()}


@pytest.mark.parametrize("kd", [False, True], ids=["ce", "kd"])
def test_one_step_is_the_same_for_1x2_and_2x1_micro_batches_and_the_weights_change_it(
    kd, tiny_qwen, tiny_teacher, tmp_path
):
    teacher = str(tiny_teacher) if kd else None
    step = dict(model_dir=str(tiny_qwen), pairs=PAIRS, out=str(tmp_path), teacher_dir=teacher)
    one_batch = one_step(weights=WEIGHTS, batch=2, accumulation=1, **step)
    accumulated = one_step(weights=WEIGHTS, batch=1, accumulation=2, **step)
    unweighted = one_step(weights=WEIGHTS, weighted=False, batch=2, accumulation=1, **step)
    same, differs = max_relative_difference(accumulated, one_batch), max_relative_difference(unweighted, one_batch)
    label = "kd" if kd else "ce"
    print(f"\n[{label}] 2 micro-batches of 1 vs 1 of 2: {same:.2e}; unweighted vs weighted: {differs:.2e}")
    assert same < TOLERANCE
    assert differs > 1e-3


def test_accumulation_does_not_rely_on_loss_is_scaled_for_ga(tiny_qwen, tmp_path):
    # transformers < 5.19 have no `loss_is_scaled_for_ga`: with it unset, 5.19 decides as they do.
    step = dict(model_dir=str(tiny_qwen), pairs=PAIRS, weights=WEIGHTS, out=str(tmp_path))
    one_batch = one_step(batch=2, accumulation=1, **step)
    accumulated = one_step(batch=1, accumulation=2, scaled_flag=False, **step)
    difference = max_relative_difference(accumulated, one_batch)
    print(f"\n2 micro-batches of 1 (flag unset) vs 1 of 2: {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("kd", [False, True], ids=["ce", "kd"])
def test_a_sample_of_weight_two_counts_as_the_same_sample_twice(kd, tiny_qwen, tiny_teacher, tmp_path):
    step = dict(model_dir=str(tiny_qwen), out=str(tmp_path), teacher_dir=str(tiny_teacher) if kd else None)
    weighted = one_step(pairs=PAIRS, weights=[2.0, 1.0], batch=1, accumulation=2, **step)
    twice = one_step(pairs=[PAIRS[0], *PAIRS], weights=[1.0, 1.0, 1.0], batch=1, accumulation=3, **step)
    difference = max_relative_difference(weighted, twice)
    print(f"\n[{'kd' if kd else 'ce'}] weight 2 vs twice: {difference:.2e}")
    assert difference < TOLERANCE


def test_the_step_is_the_sgd_update_computed_by_hand(tiny_qwen, initial, tmp_path):
    # theta' = theta - lr * grad(sum_i w_i * mean_i / sum_i w_i), mean_i: sample i's mean next-token CE on its answer.
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    rows = tokenize_split(conversation_rows(PAIRS, WEIGHTS), tokenizer, max_length=None, weighted=True).rows
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    loss = 0.0
    for row, w in zip(rows, WEIGHTS, strict=True):
        ids, mask = torch.tensor([row["input_ids"]]), torch.tensor(row["completion_mask"][1:]).bool()
        logits = model(input_ids=ids).logits[0, :-1]
        loss = loss + w * torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask]) / sum(WEIGHTS)
    loss.backward()
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected[name] = p - LEARNING_RATE * p.grad
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied
    step = dict(model_dir=str(tiny_qwen), pairs=PAIRS, weights=WEIGHTS, out=str(tmp_path))
    for batch, accumulation in ((2, 1), (1, 2)):
        trained = one_step(batch=batch, accumulation=accumulation, **step)
        difference = max_relative_difference(trained, expected)
        moved = max_relative_difference(initial, expected)
        print(f"\n{accumulation} micro-batch(es) of {batch} vs by hand: {difference:.2e} (the step moved {moved:.2e})")
        assert difference < TOLERANCE < moved


def test_two_processes_give_the_same_step_as_one(tiny_qwen, tmp_path):
    spec = dict(model_dir=str(tiny_qwen), pairs=PAIRS, weights=WEIGHTS, out=str(tmp_path / "ddp"), batch=1)
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "accumulation": 1, "save": str(tmp_path / "ddp.st")}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # `--cpu` would start one process: the processes run on the CPU through one_step's `use_cpu` instead.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "tests/sft/one_step.py"]
    done = subprocess.run(
        [*launch, str(tmp_path / "spec.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two_processes = load_file(tmp_path / "ddp.st")
    assert two_processes.pop("processes").item() == 2, "the launch did not train on two processes"
    one_process = one_step(**{**spec, "batch": 2, "out": str(tmp_path / "one")}, accumulation=1)
    difference = max_relative_difference(two_processes, one_process)
    print(f"\n2 processes with 1 sample each vs 1 process with both: {difference:.2e}")
    assert difference < TOLERANCE
