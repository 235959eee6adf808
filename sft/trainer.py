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
from functools import partial

import torch
import torch.distributed.tensor
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection, prepare_deepspeed
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from pipeline.records import Col
from sft.config import DistillArguments
from sft.data import TOPK_TRAIN_COLUMNS
from sft.losses import DenseTeacher, SparseTeacher, chunked_distillation_loss, temperature_at


@dataclass
class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's collator, plus a `token_weight` tensor laid out exactly like `labels` (padded or padding-free): each row's
    one `sample_weight` w spread as w / n over its n loss tokens, 0 elsewhere."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call([{k: v for k, v in ex.items() if k not in _OURS} for ex in examples])
        weights = []
        for ex in examples:
            mask = torch.tensor(ex["labels"]).ne(-100).float()  # TRL built the labels from our completion_mask
            weights.append(mask * (float(ex["sample_weight"]) / max(float(mask.sum()), 1.0)))
        batch["token_weight"] = self._pad(weights, 0.0)
        if Col.TOPK_TOKEN_IDS in examples[0]:  # sparse KD: [batch, tokens, K], the top-k at each completion token
            ids, logprobs = zip(*(_topk_rows(ex) for ex in examples), strict=True)
            batch["topk_ids"], batch["topk_logprobs"] = self._pad(ids, 0), self._pad(logprobs, float("-inf"))
        return batch

    def _pad(self, rows, value) -> torch.Tensor:
        rows = [torch.cat(rows)] if self.padding_free else list(rows)
        return pad(rows, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)


_OURS = {"sample_weight", *TOPK_TRAIN_COLUMNS}  # columns TRL's collator must not see


def _topk_rows(example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's stored top-k laid out like its tokens: [tokens, K], empty (id 0, log-prob -inf) on the prompt."""
    k = int(example[Col.TEACHER_TOPK])
    prompt = len(example["input_ids"]) - len(example[Col.TOPK_TOKEN_IDS]) // k
    ids = torch.tensor(example[Col.TOPK_TOKEN_IDS], dtype=torch.long).view(-1, k)
    logprobs = torch.tensor(example[Col.TOPK_LOGPROBS], dtype=torch.float32).view(-1, k)
    return (
        torch.cat([ids.new_zeros(prompt, k), ids]),
        torch.cat([logprobs.new_full((prompt, k), float("-inf")), logprobs]),
    )


def scored_weights(labels: torch.Tensor, token_weight: torch.Tensor, weighted: bool) -> torch.Tensor:
    """The weight of each position that predicts a label (position t predicts token t + 1): its token's, or 1."""
    scored = labels[:, 1:] != -100
    return token_weight[:, 1:][scored] if weighted else scored[scored].float()


def _full(weight: torch.Tensor) -> torch.Tensor:
    """An lm_head weight whole: under FSDP2 it is a DTensor shard (as TRL's distillation loss handles it)."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        return weight.full_tensor()
    return weight


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PEFT model (its LoRA layers live inside it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class DistillSFTTrainer(SFTTrainer):
    def __init__(self, *args, distill: DistillArguments, teacher: torch.nn.Module | None = None, **kwargs):
        if kwargs["args"].completion_only_loss is None:  # our rows carry a completion mask but no "prompt" column
            kwargs["args"].completion_only_loss = True
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = teacher
        self.stored_kd = distill.kd_source == "stored"
        self.custom_loss = distill.weighted_loss or teacher is not None or self.stored_kd
        if self.custom_loss:
            _check_head(self.model, "student")
            # Our loss is already this micro-batch's share of the whole step: the Trainer must not divide it by the
            # accumulation steps. transformers 4.56-5.18 (trl 1.16 needs >= 4.56.2) skip the division when the model
            # accepts loss kwargs and `num_items_in_batch` is set (get_batch_samples below always sets it); 5.19
            # reads `loss_is_scaled_for_ga` first. Both are set so that every allowed version agrees.
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True
            c = self.data_collator
            self.data_collator = WeightedCollator(**{f.name: getattr(c, f.name) for f in fields(c)})
            # The loss runs inside the wrapper's forward (DDP, FSDP, DeepSpeed), as TRL's distillation trainer runs
            # its own, so that sharded parameters, the lm_head's included, are whole while it reads them.
            self._forward_redirection = _ForwardRedirection()
        if teacher is not None:
            _check_head(teacher, "teacher")
            teacher = teacher.eval().requires_grad_(False)
            # As TRL's trainers prepare a frozen model: sharded by ZeRO-3 like the student, or placed on this rank.
            if self.is_deepspeed_enabled:
                self.teacher = prepare_deepspeed(teacher, self.accelerator)
            else:
                self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "sample_weight", "length", *TOPK_TRAIN_COLUMNS]

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
        # Position t predicts token t + 1: score the shifted labels, weighted by the weight of the predicted token.
        scored = labels[:, 1:] != -100
        target = labels[:, 1:][scored]
        weights = scored_weights(labels, token_weight, self.distill.weighted_loss)
        if num_items_in_batch is None:  # evaluation, or a call outside training: this batch's own weighted mean
            total_weight, ranks = weights.sum(), 1
        else:  # training: the step's total weight (get_batch_samples); DDP averages the ranks' gradients
            total_weight, ranks = num_items_in_batch, self.accelerator.num_processes
        teacher, temperature = None, 1.0
        if self.teacher is not None:
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher, unwrapped_teacher, _scored_hidden, unwrapped_teacher, inputs, scored
                )
            teacher = DenseTeacher(teacher_hidden, _causal_lm(unwrapped_teacher).get_output_embeddings().weight)
            temperature = self.kd_temperature()
        elif self.stored_kd:
            teacher = SparseTeacher(inputs.pop("topk_ids")[:, 1:][scored], inputs.pop("topk_logprobs")[:, 1:][scored])
            temperature = self.kd_temperature()
        unwrapped = self.accelerator.unwrap_model(model)
        loss, ce, kd = self._forward_redirection(
            model,
            unwrapped,
            self._loss,
            unwrapped,
            inputs,
            scored,
            target,
            weights,
            total_weight,
            teacher,
            temperature,
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
        return (loss, {}) if return_outputs else loss

    def _loss(self, unwrapped, inputs, scored, target, weights, total_weight, teacher, temperature):
        """Runs as the model's forward: the final hidden states of the scored positions, then the loss from them in
        chunks of positions (sft/losses.py), so the [tokens, vocabulary] logits never exist whole."""
        hidden = _scored_hidden(unwrapped, inputs, scored)
        head = _causal_lm(unwrapped).get_output_embeddings().weight
        # ZeRO-3 partitions both heads outside their own forward, which never runs here (TRL's fused losses alike).
        gather = partial(maybe_gather_lm_head_ctx, head, teacher.weight if isinstance(teacher, DenseTeacher) else None)
        with gather():
            if isinstance(teacher, DenseTeacher):
                teacher = DenseTeacher(teacher.hidden, _full(teacher.weight).to(hidden.device))
            return chunked_distillation_loss(
                hidden,
                _full(head),
                target,
                weights,
                self.distill.kd_alpha if teacher is not None else 0.0,
                temperature,
                total_weight,
                teacher,
                self.distill.loss_chunk_size,
                gather,
            )


def _scored_hidden(model: torch.nn.Module, inputs: dict, scored: torch.Tensor) -> torch.Tensor:
    """The backbone's final (normed) hidden states at the positions that predict a label: [N, hidden]."""
    hidden = _causal_lm(model).base_model(**inputs).last_hidden_state
    return hidden[:, :-1][scored]


def _check_head(model: torch.nn.Module, role: str) -> None:
    """Our loss applies the lm_head's weight itself: refuse heads whose logits are more than hidden @ weight.T."""
    causal = _causal_lm(model)
    head = causal.get_output_embeddings()
    config = causal.config.get_text_config()
    scales = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
    extra = [name for name in scales if getattr(config, name, None)]
    if hasattr(head, "base_layer"):  # a PEFT adapter on lm_head: its weight is the base layer's, the adapter unused
        extra.append("a LoRA adapter on lm_head (remove lm_head from lora_target_modules)")
    if head is None or getattr(head, "bias", None) is not None or extra or not isinstance(head.weight, torch.Tensor):
        raise ValueError(
            f"the {role} ({config.model_type}) computes its logits with more than a linear lm_head without bias "
            f"({', '.join(extra) or 'its output layer'}); the chunked loss of distill sft takes Llama/Qwen-style heads"
        )
