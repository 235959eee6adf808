"""TRL's SFTTrainer with per-sample loss weights and logit distillation from a local teacher.

TRL's own `DistillationTrainer` is on-policy: it samples new completions from the student and fits a generalized JSD.
We train on the teacher's verified completions instead, with KL mixed into the cross-entropy and an annealed
temperature, so a small subclass of `SFTTrainer` fits better. With neither feature on, TRL's loss runs unchanged.

With either feature on, a sample's weight is its share of the whole optimizer step: the loss of each micro-batch is
its weighted token sum divided by the token weight of every micro-batch of the step on every rank, counted before the
step (the mechanism transformers uses for `num_items_in_batch`). So the update does not depend on how the step's
samples are split into micro-batches, accumulation steps and ranks, and a sample of weight 2 counts as that sample
twice.
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


def scored_weights(labels: torch.Tensor, token_weight: torch.Tensor, weighted: bool) -> torch.Tensor:
    """The weight of each position that predicts a label (position t predicts token t + 1): its token's, or 1."""
    scored = labels[:, 1:] != -100
    return token_weight[:, 1:][scored] if weighted else scored[scored].float()


class DistillSFTTrainer(SFTTrainer):
    def __init__(self, *args, distill: DistillArguments, teacher: torch.nn.Module | None = None, **kwargs):
        if kwargs["args"].completion_only_loss is None:  # our rows carry a completion mask but no "prompt" column
            kwargs["args"].completion_only_loss = True
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = teacher
        self.custom_loss = distill.weighted_loss or teacher is not None
        if self.custom_loss:
            # Our loss is already this micro-batch's share of the whole step: the Trainer must not divide it by the
            # accumulation steps. transformers 4.56-5.18 (trl 1.16 needs >= 4.56.2) skip the division when the model
            # accepts loss kwargs and `num_items_in_batch` is set (get_batch_samples below always sets it); 5.19
            # reads `loss_is_scaled_for_ga` first. Both are set so that every allowed version agrees.
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True
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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, and with our loss the step's total token weight over all ranks."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.custom_loss:
            return batches, num_items
        weighted = self.distill.weighted_loss
        local = sum(
            (scored_weights(b["labels"], b["token_weight"], weighted).sum().to(device) for b in batches),
            torch.zeros((), device=device),
        )
        return batches, self.accelerator.gather(local.reshape(1)).sum()

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
        weights = scored_weights(labels, token_weight, self.distill.weighted_loss)
        if num_items_in_batch is None:  # evaluation, or a call outside training: this batch's own weighted mean
            total_weight, ranks = weights.sum(), 1
        else:  # training: the step's total weight (get_batch_samples); DDP averages the ranks' gradients
            total_weight, ranks = num_items_in_batch, self.accelerator.num_processes
        teacher_logits, temperature = None, 1.0
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits[:, :-1][scored]
            vocab = min(student.shape[-1], teacher_logits.shape[-1])  # padded embedding rows beyond the tokenizer
            student, teacher_logits = student[:, :vocab], teacher_logits[:, :vocab]
            temperature = self.kd_temperature()
        loss, ce, kd = distillation_loss(
            student, teacher_logits, target, weights, self.distill.kd_alpha, temperature, total_weight
        )
        mode = "train" if model.training else "eval"
        to_batch_mean = float(total_weight) / max(float(weights.sum()), 1e-12)  # logged: this micro-batch's own mean
        self._metrics[mode]["ce_loss"].append(ce.item() * to_batch_mean)
        if kd is not None:
            self._metrics[mode]["kd_loss"].append(kd.item() * to_batch_mean)
            self._metrics[mode]["kd_temperature"].append(temperature)
        if mode == "train":  # trained tokens, padding excluded, as TRL counts them
            seen = (
                inputs["attention_mask"].sum()
                if "attention_mask" in inputs
                else inputs["position_ids"].new_tensor(inputs["position_ids"].size(1))
            )
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(seen).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        loss = loss * ranks
        return (loss, {"logits": logits}) if return_outputs else loss
