"""`distill sft`: fine-tune a student on a `distill build` dataset with TRL, optionally distilling a teacher's logits.

    distill sft --config recipes/sft/demo-cpu.yaml
    distill sft --config recipes/sft/demo-cpu.yaml --output_dir runs/demo/student-2 --max_steps 20
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m pipeline.cli \
        sft --config recipes/sft/qwen2.5-math-7b.yaml

The recipe is flat YAML over `trl.SFTConfig`, `trl.ModelConfig` and `sft.config.DistillArguments`; `--field value`
overrides any of them. A run resumes from the last checkpoint in `output_dir`. Beside the model, `output_dir` keeps
TRL's `trainer_state.json`, `sft_lint.json` (the checks run before training), `sft_exclusions.jsonl` (every row not
trained on, with its reason) and `distill_sft.json` (what was trained on what).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from pipeline.models import resolve_model
from pipeline.parts import write_atomic_bytes
from sft.config import DistillArguments
from sft.data import load_split, tokenize_split
from sft.lint import end_of_turn_token, lint_collated, lint_rows
from sft.trainer import DistillSFTTrainer

TOKENIZED_CACHE = ".tokenized"  # in output_dir: the tokenized rows, kept for the other ranks and for a resume


def make_parser() -> TrlParser:
    parser = TrlParser((DistillArguments, SFTConfig, ModelConfig))
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        parser.set_defaults(bf16=False)  # TRL defaults to bf16, which a machine without a GPU refuses
    return parser


def _check_settings(distill: DistillArguments, cfg: SFTConfig, model_args: ModelConfig) -> None:
    """Refuse combinations that would train wrongly, and pick batching by what the attention kernel allows."""
    flash = (model_args.attn_implementation or "").startswith(("flash_attention", "kernels-community"))
    if (cfg.padding_free or cfg.packing) and not flash:
        raise ValueError(
            f"padding_free/packing need a varlen attention kernel (attn_implementation=flash_attention_2), not "
            f"{model_args.attn_implementation or 'the default'}: without one, packed samples attend to each other"
        )
    if cfg.packing and (distill.weighted_loss or distill.teacher_model_name_or_path or distill.kd_source == "stored"):
        raise ValueError("weighted_loss and distillation need whole samples per row: use padding_free, not packing")
    if not (cfg.padding_free or cfg.packing) and cfg.train_sampling_strategy == "random":
        cfg.train_sampling_strategy = "group_by_length"  # padded batches of similar lengths waste least compute


def _write_json(path: Path, obj) -> None:
    write_atomic_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _load_model(path: str, model_args: ModelConfig):
    quantization = get_quantization_config(model_args)  # QLoRA (load_in_4bit) needs bitsandbytes and a GPU
    return AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        device_map={"": torch.cuda.current_device()} if quantization else None,
    )


def _check_teacher_tokenizer(distill: DistillArguments, tokenizer) -> str:
    path = resolve_model(distill.teacher_model_name_or_path).path
    if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher {path} and the student do not share a tokenizer: distillation compares their distributions "
            "token by token, so it needs one (choose a student of the teacher's family, or train without KD)"
        )
    return path


def _load_teacher(distill: DistillArguments, tokenizer, model_args: ModelConfig):
    """The teacher for `kd_source: model`; with `stored` none is loaded (its top-k is in the dataset)."""
    path = _check_teacher_tokenizer(distill, tokenizer)
    if distill.kd_source == "stored":  # named for the tokenizer check alone
        return None
    # Under FSDP with cpu_ram_efficient_loading (recipes/accelerate/fsdp.yaml), transformers loads real weights on
    # rank 0 alone and zeros elsewhere, for FSDP to broadcast when it wraps the model; the frozen teacher is not
    # wrapped, so every rank loads it itself, or ranks 1..N would distil towards a network of zeros.
    with mock.patch.dict(os.environ, {"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation
        )


def train(distill: DistillArguments, cfg: SFTConfig, model_args: ModelConfig) -> Path:
    _check_settings(distill, cfg, model_args)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    student_path = resolve_model(model_args.model_name_or_path).path
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    if cfg.chat_template_path:  # applied before we tokenize, so that the lint checks the template really used
        if not cfg.chat_template_path.endswith(".jinja"):
            raise ValueError(f"chat_template_path must be a .jinja file, got {cfg.chat_template_path}")
        tokenizer.chat_template = Path(cfg.chat_template_path).read_text()

    # Rank 0 reads and tokenizes into the cache first; the other ranks then read its cache (and so does a resume).
    with cfg.main_process_first(desc="tokenizing the dataset"):
        split = tokenize_split(
            load_split(distill.dataset, "train", distill.max_samples),
            tokenizer,
            cfg.max_length,
            distill.weighted_loss,
            cfg.dataset_num_proc,
            cache_dir=output / TOKENIZED_CACHE,
            teacher_tokens=distill.kd_source == "stored",
        )
    if cfg.should_save:  # the main process alone writes the records
        write_atomic_bytes(
            output / "sft_exclusions.jsonl", "".join(json.dumps(e) + "\n" for e in split.excluded).encode()
        )
    report = lint_rows(split, distill.overlong, cfg.max_length)
    cfg.max_length = None  # every kept row fits: TRL must not truncate anything

    trainer = DistillSFTTrainer(
        model=_load_model(student_path, model_args),
        args=cfg,
        train_dataset=split.rows,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        distill=distill,
        teacher=_load_teacher(distill, tokenizer, model_args) if distill.teacher_model_name_or_path else None,
    )
    eot_id, eot_token = end_of_turn_token(tokenizer)
    report["end_of_turn_token"] = eot_token
    report["collated_rows_checked"] = lint_collated(trainer, eot_id, eot_token)
    if cfg.should_save:
        _write_json(output / "sft_lint.json", report)
        print(f"distill sft: lint passed: {json.dumps(report)}", file=sys.stderr)

    with cfg.main_process_first(desc="finding the last complete checkpoint"):  # only rank 0 removes a cut-short one
        resume = cfg.resume_from_checkpoint or last_complete_checkpoint(output, remove=cfg.should_save)
    if resume:
        print(f"distill sft: resuming from {resume}", file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output))
    trainer.save_state()  # trainer_state.json (loss curve, steps) beside the model, as TRL scripts leave it
    if model_args.use_peft and distill.merge_lora and cfg.should_save:
        _merge_lora(trainer, tokenizer, output)
    summary = {
        "student": model_args.model_name_or_path,
        "teacher": distill.teacher_model_name_or_path,
        "kd_source": distill.kd_source,
        "dataset": distill.dataset,
        "rows_trained": len(split.rows),
        "rows_excluded": len(split.excluded),
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "processes": cfg.world_size,
    }
    if cfg.should_save:
        _write_json(output / "distill_sft.json", summary)
    return output


def last_complete_checkpoint(output: Path, remove: bool = True) -> str | None:
    """The newest checkpoint that was saved to the end; newer ones cut short by a kill are removed (by the main
    process alone: `remove=False` on the others, which run after it and find them gone).

    transformers writes trainer_state.json last, and resuming from a checkpoint without it fails, so an
    interruption during a save would otherwise make every later resume crash.
    """
    complete = sorted(
        (p for p in output.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    while complete:
        last = complete.pop()
        if (last / "trainer_state.json").exists():
            return str(last)
        if remove:
            print(f"distill sft: removing {last}: its save was interrupted (no trainer_state.json)", file=sys.stderr)
            shutil.rmtree(last)
    return None


def _merge_lora(trainer, tokenizer, output: Path) -> None:
    """Adapter to output/adapter; the merged full model, loadable by vLLM and transformers, to output."""
    adapter = output / "adapter"
    adapter.mkdir(exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.move(output / name, adapter / name)
    trainer.model.merge_and_unload().save_pretrained(output)
    tokenizer.save_pretrained(output)


def main(argv: list[str] | None = None) -> int:
    distill, cfg, model_args = make_parser().parse_args_and_config(argv)
    train(distill, cfg, model_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
