"""TRL's SFTTrainer with per-sample loss weights and logit distillation from a local teacher.

TRL's own `DistillationTrainer` is on-policy: it samples new completions from the student and fits a generalized JSD.
We train on the teacher's verified completions instead, with KL mixed into the cross-entropy and an annealed
temperature, so a small subclass of `SFTTrainer` fits better. With neither feature on, TRL's loss runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from sft.config import DistillArguments
from sft.losses import distillation_loss, temperature_at


@dataclass
class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's collator, plus a `token_weight` tensor laid out exactly like `labels` (padded or padding-free)."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call([{k: v for k, v in ex.items() if k != "token_weight"} for ex in examples])
        weights = [torch.tensor(ex["token_weight"], dtype=torch.float32) for ex in examples]
        if self.padding_free:
            weights = [torch.cat(weights)]
        batch["token_weight"] = pad(
            weights, padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
        )
        return batch


class DistillSFTTrainer(SFTTrainer):
    def __init__(self, *args, distill: DistillArguments, teacher: torch.nn.Module | None = None, **kwargs):
        if kwargs["args"].completion_only_loss is None:  # our rows carry a completion mask but no "prompt" column
            kwargs["args"].completion_only_loss = True
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = teacher
        self.custom_loss = distill.weighted_loss or teacher is not None
        if self.custom_loss:
            # Our loss is a per-micro-batch mean: let the Trainer divide it by the accumulation steps.
            self.loss_is_scaled_for_ga = False
            c = self.data_collator
            self.data_collator = WeightedCollator(**{f.name: getattr(c, f.name) for f in fields(c)})
        if teacher is not None:
            self.teacher = teacher.to(self.accelerator.device).eval().requires_grad_(False)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "token_weight", "length"]

    def kd_temperature(self) -> float:
        d = self.distill
        progress = self.state.global_step / max(self.state.max_steps, 1)
        return temperature_at(progress, d.kd_temperature_start, d.kd_temperature_end, d.kd_temperature_schedule)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_weight = inputs.pop("token_weight", None)
        if not self.custom_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        logits = model(**inputs).logits
        # Position t predicts token t + 1: score the shifted labels, weighted by the weight of the predicted token.
        scored = labels[:, 1:] != -100
        student = logits[:, :-1][scored]
        target = labels[:, 1:][scored]
        weights = (
            token_weight[:, 1:][scored] if self.distill.weighted_loss else torch.ones_like(target, dtype=torch.float32)
        )
        teacher_logits, temperature = None, 1.0
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits[:, :-1][scored]
            vocab = min(student.shape[-1], teacher_logits.shape[-1])  # padded embedding rows beyond the tokenizer
            student, teacher_logits = student[:, :vocab], teacher_logits[:, :vocab]
            temperature = self.kd_temperature()
        loss, ce, kd = distillation_loss(
            student, teacher_logits, target, weights, alpha=self.distill.kd_alpha, temperature=temperature
        )
        mode = "train" if model.training else "eval"
        self._metrics[mode]["ce_loss"].append(ce.item())
        if kd is not None:
            self._metrics[mode]["kd_loss"].append(kd.item())
            self._metrics[mode]["kd_temperature"].append(temperature)
        if mode == "train":  # trained tokens, padding excluded, as TRL counts them
            seen = (
                inputs["attention_mask"].sum()
                if "attention_mask" in inputs
                else inputs["position_ids"].new_tensor(inputs["position_ids"].size(1))
            )
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(seen).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"logits": logits}) if return_outputs else loss
