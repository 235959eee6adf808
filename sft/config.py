"""What `distill sft` adds to TRL's own configs.

A recipe is one flat YAML file, as in TRL and open-r1: the fields of `trl.SFTConfig` (learning rate, epochs,
`max_length`, `output_dir`, ...), of `trl.ModelConfig` (`model_name_or_path`, `dtype`, `use_peft`, `lora_r`, ...) and
of `DistillArguments` below. `TrlParser` reads all three, so every field can be overridden on the command line as
`--field value`, and an unknown field is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillArguments:
    dataset: str = field(
        default="runs/demo/dataset",
        metadata={
            "help": "A dataset folder written by `distill build` (RUN/dataset), or a Hub dataset id when online."
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of the train split only (smoke runs)."}
    )
    weighted_loss: bool = field(
        default=False,
        metadata={
            "help": "Scale each sample's loss by the dataset's `weight` column: a per-token mean within each sample, "
            "then the weighted mean over all samples of the optimizer step (every micro-batch, accumulation step and "
            "rank), so a sample of weight 2 counts as that sample twice, however the step is split."
        },
    )
    overlong: str = field(
        default="drop",
        metadata={
            "help": "What to do with samples longer than `max_length`: `drop` them (counted in sft_lint.json, listed "
            "in sft_exclusions.jsonl) or `fail` before training. Nothing is ever truncated silently.",
            "choices": ["drop", "fail"],
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Logit distillation: a local teacher sharing the student's tokenizer. Loss = kd_alpha * T^2 * "
            "KL(teacher_T || student_T) + (1 - kd_alpha) * cross-entropy."
        },
    )
    kd_source: str = field(
        default="model",
        metadata={
            "help": "Where the teacher's distribution comes from: `model` loads teacher_model_name_or_path beside the "
            "student (full vocabulary); `stored` reads the top-k log-probs the served teacher returned at generation "
            "(`sampling.teacher_topk`), with no teacher loaded, and trains on the teacher's own sampled token ids.",
            "choices": ["model", "stored"],
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions per chunk of the memory-bounded loss (the lm_head is applied one chunk at a time); "
            "default: sized by the vocabulary (sft/losses.py)."
        },
    )
    kd_alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term; 1 - kd_alpha weighs the CE."})
    kd_temperature_start: float | None = field(
        default=None,
        metadata={
            "help": "Distillation temperature T at step 0 (default 5; 1 with kd_source=stored: the stored top-k is "
            "the teacher at T 1, and at T > 1 the tail it lacks would hold most of the teacher's mass)."
        },
    )
    kd_temperature_end: float = field(default=1.0, metadata={"help": "Distillation temperature T at the last step."})
    kd_temperature_schedule: str = field(
        default="linear",
        metadata={"help": "How T moves from start to end over training.", "choices": ["linear", "cosine", "constant"]},
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "With use_peft: save the merged model in output_dir (loadable by vLLM and transformers) and the "
            "adapter in output_dir/adapter."
        },
    )

    def __post_init__(self):
        if self.overlong not in ("drop", "fail"):
            raise ValueError(f"overlong must be 'drop' or 'fail', got {self.overlong!r}")
        if self.kd_temperature_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"kd_temperature_schedule must be linear, cosine or constant: {self.kd_temperature_schedule}"
            )
        if self.kd_source not in ("model", "stored"):
            raise ValueError(f"kd_source must be 'model' or 'stored', got {self.kd_source!r}")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.kd_temperature_start is None:
            self.kd_temperature_start = 1.0 if self.kd_source == "stored" else 5.0
        if min(self.kd_temperature_start, self.kd_temperature_end) <= 0:
            raise ValueError("distillation temperatures must be positive")
