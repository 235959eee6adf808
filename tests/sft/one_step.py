"""One optimizer step of the real DistillSFTTrainer over given weighted conversations, returning the parameters.

Plain SGD with a constant learning rate, no clipping and no weight decay, so that the update is the learning rate times
the gradient and any error in how samples are weighed shows in the parameters. Imported by the tests for one process;
run as a script under `accelerate launch --multi_gpu --num_processes 2 tests/sft/one_step.py SPEC.json` for several
(rank 0 saves the parameters to SPEC["save"]). Everything runs on the CPU (`use_cpu`), so that the processes meet
through gloo on any machine. `accelerate launch --cpu --num_processes 2` would start one process only: accelerate
starts several CPU processes through mpirun alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.config import DistillArguments
from sft.data import tokenize_split
from tests.sft.conftest import conversation_rows, make_trainer

LEARNING_RATE = 1.0


def one_step(
    model_dir: str,
    pairs: list[tuple[str, str]],
    weights: list[float],
    out: str,
    batch: int,
    accumulation: int,
    teacher_dir: str | None = None,
    weighted: bool = True,
    scaled_flag: bool = True,
) -> dict[str, torch.Tensor]:
    """`scaled_flag=False` leaves `loss_is_scaled_for_ga` unset, as transformers < 5.19 (which lack it) do."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = tokenize_split(conversation_rows(pairs, weights), tokenizer, max_length=None, weighted=weighted)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32) if teacher_dir else None
    distill = DistillArguments(weighted_loss=weighted, kd_alpha=0.5, kd_temperature_schedule="constant")
    trainer = make_trainer(
        Path(model_dir),
        split.rows,
        Path(out),
        distill,
        teacher,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
    )
    if not scaled_flag:
        trainer.loss_is_scaled_for_ga = None
    trainer.train()
    return {k: v.detach().cpu().clone().contiguous() for k, v in trainer.model.state_dict().items()}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    save = spec.pop("save")
    params = one_step(**spec)
    state = PartialState()  # as the Trainer set it up: proves the processes really trained together
    if state.is_main_process:
        save_file({**params, "processes": torch.tensor(state.num_processes)}, save)


if __name__ == "__main__":
    main(sys.argv[1])
