"""The two losses `distill sft` adds to TRL's cross-entropy, as pure functions so they can be checked by hand.

Per-token weights carry both ideas at once. A sample of weight w with n loss tokens gives each of them w / n, so
`sum(c_t * loss_t) / sum(c_t)` is exactly "a per-token mean within each sample, then the w-weighted mean over the
samples", and it stays right when samples of different lengths share a padded or padding-free batch. In training the
denominator is `sum(c_t)` over the whole optimizer step, not over one micro-batch (sft/trainer.py): otherwise the
weights would cancel within each micro-batch, and with one sample per device they would do nothing.

Memory. `distillation_loss` takes full `[N, V]` logits: for Qwen (V = 152,064) one 32k-token sample is 19.5 GB per
float32 copy, and the KD loss with autograd peaks at about 7.6 (benchmarks/loss_memory.py). `chunked_distillation_loss`
gives the same numbers from the final hidden states `[N, H]` and the `lm_head` weight `[V, H]` without ever holding
`[N, V]`: a fused linear cross-entropy (`_FusedLinearLosses`) applies the head to `chunk_size` positions at a time, in
the forward for the per-position losses, and again in the backward, where each chunk's logit gradient (times its
positions' upstream gradients) goes straight into the hidden-state gradient and a `[V, H]` float32 weight-gradient
buffer. Recomputing
costs one extra head matmul per chunk (two with a loaded teacher) but is what lets the function return per-position
losses with exact autograd semantics: `weighted_mean` of them is the loss, the same code as the full-logits path.
The weight gradient is a sum over positions, so per-position upstream gradients (our token weights) must be applied
before that sum; computing the gradients in the forward, as Liger does for reduction="mean", cannot give them.

Kernel choice: this pure-PyTorch path everywhere (CPU and GPU), one code path for cross-entropy and both kinds of
distillation, tested here. Liger-Kernel 0.8.5 (`liger_kernel.chunked_loss.fused_linear_distillation.
LigerFusedLinearDistillationBase._compute_loss`) divides every chunk's hard and soft loss by
`(full_target != ignore_index).sum()` and takes no per-token weight, so it cannot express
`sum_t w_t * loss_t / total_weight` with the step's total; it also takes only a dense teacher (no stored top-k) and
zero-pads the student's logits where the teacher's vocabulary is larger instead of comparing the shared rows.
Liger's `LigerFusedLinearCrossEntropyFunction` with reduction="none" could give the weighted cross-entropy alone
(since PR #1298, in 0.8.5, it defers the gradient to a backward recompute that folds in a per-token grad_output;
before it silently scaled every gradient by grad_output[0], linkedin/Liger-Kernel#968), but it needs CUDA and
Triton, so it could not be checked against this path here, and cross-entropy-only and KD recipes would then compute
CE differently. Cut-cross-entropy likewise covers the CE only. A Liger CE path is a measured follow-up on a GPU.

Default chunk: `CHUNK_LOGITS_BYTES` (256 MiB) of float32 logits, 440 positions for V = 152,064 (1360 for
SmolLM2's 49,152). A chunk holds at most three such `[chunk, V]` float32 tensors (student logits, teacher logits,
one scratch: the steps below work in place), so about 0.8 GB transient whatever N is, small beside the `[V, H]`
weight gradient that any loss produces (0.93 GB in float32 for Qwen2-1.5B), and a 441-row matmul still keeps a GPU
busy. Pass `chunk_size` to trade memory for fewer, larger matmuls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def weighted_mean(
    per_token: torch.Tensor, weights: torch.Tensor, total_weight: torch.Tensor | float | None = None
) -> torch.Tensor:
    """sum(weights * per_token) / total_weight, by default sum(weights): a batch's weighted mean, or with the whole
    step's total its share of the step's mean. A step without weight gives a differentiable 0, not NaN."""
    total = weights.sum() if total_weight is None else torch.as_tensor(total_weight, dtype=torch.float32)
    return (per_token * weights).sum() / total.to(per_token.device).clamp(min=1e-12)


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position KL(p_teacher,T || p_student,T) over the last (vocabulary) dimension."""
    student_log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    total_weight: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """alpha * T^2 * KL + (1 - alpha) * CE over N scored positions: logits [N, V], labels and weights [N].

    Both terms are weighted sums over the positions divided by `total_weight` (the token weight of the whole
    optimizer step in training; by default these positions' own, a weighted mean), so KD and CE weigh samples alike.
    T^2 keeps the gradient of the soft term on the scale of the hard one as T changes (Hinton et al., 2015).
    Returns (loss, ce, kd); kd is None without a teacher.
    """
    ce = weighted_mean(F.cross_entropy(student_logits.float(), labels, reduction="none"), token_weights, total_weight)
    if teacher_logits is None or alpha == 0:
        return ce, ce, None
    kd = weighted_mean(kl_teacher_student(student_logits, teacher_logits, temperature), token_weights, total_weight)
    return alpha * temperature**2 * kd + (1 - alpha) * ce, ce, kd


def temperature_at(progress: float, start: float, end: float, schedule: str = "linear") -> float:
    """Distillation temperature after `progress` (0..1) of training: soft targets early, sharp ones late."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    raise ValueError(f"unknown temperature schedule {schedule!r}")


# --- The memory-bounded path -----------------------------------------------------------------------------------------

CHUNK_LOGITS_BYTES = 256 * 2**20
IGNORE_INDEX = -100  # F.cross_entropy's default: such a label scores nothing


@dataclass
class DenseTeacher:
    """A loaded teacher at the scored positions: its final hidden states `[N, Ht]` and its `lm_head` weight
    `[Vt, Ht]`, both without grad. Student and teacher are compared over the first min(V, Vt) vocabulary rows (the
    rest are padded embedding rows beyond the tokenizer), the student's cross-entropy too, as sft/trainer.py has
    always cut both logits."""

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass
class SparseTeacher:
    """A served teacher's top-k at the scored positions, stored at generation: token ids `[N, K]` (int64) and their
    log-probabilities at T = 1 `[N, K]`. An entry with id -1 or log-prob -inf is padding (fewer than K stored)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor


def default_chunk_size(vocab: int) -> int:
    """Positions per chunk so that one `[chunk, vocab]` float32 tensor is about `CHUNK_LOGITS_BYTES`, a multiple of 8
    (tensor-core friendly) once that allows it."""
    rows = max(CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)), 1)
    return rows - rows % 8 if rows >= 8 else rows


def sparse_kl_teacher_student(
    student_logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-position KL(p || q_T) of a stored top-k teacher, over full student logits `[N, V]`.

        p_k = softmax_k(logprobs_k / T) over the K stored entries (padding excluded),
        KL  = sum_k p_k * (log p_k - log q_T(id_k)),  q_T = softmax(student_logits / T) over the whole vocabulary.

    Why this target: the stored top-k is all we know of the teacher; renormalizing it (rather than putting the
    missing mass 1 - sum_k exp(logprobs_k) anywhere) is the truncated teacher distribution, and dividing the T = 1
    log-probs by T and renormalizing is exactly how a temperature acts on logits, since log-probs differ from the
    logits by one constant per position. The student side keeps its full softmax, so the gradient
    (q_T - p scattered onto the ids) / T also pushes down the mass the student puts outside the teacher's top-k.
    A position with no stored entry has no target: KL 0.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p, valid = _sparse_target(token_ids, logprobs, temperature)
    log_q_ids = log_q.gather(1, token_ids.clamp(min=0))
    return torch.where(valid, log_p.exp() * (log_p - log_q_ids), 0.0).sum(-1)


def _sparse_target(token_ids: torch.Tensor, logprobs: torch.Tensor, temperature: float):
    """log p_k of the renormalized tempered top-k (0 where padding, never NaN) and the mask of real entries."""
    valid = (token_ids >= 0) & torch.isfinite(logprobs)
    scaled = torch.where(valid, logprobs.float() / temperature, -torch.inf)
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_p = torch.where(valid, scaled - torch.where(torch.isfinite(lse), lse, 0.0), 0.0)
    return log_p, valid


def _logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits of one chunk; the matmul runs in the inputs' dtype, like a model's lm_head followed by
    `.float()`, so bf16 weights are never copied to float32 whole."""
    return (hidden_chunk @ weight.T).float()


def _row_lse(x: torch.Tensor, scale: float, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp(x * scale) per row, through `scratch` (same shape) so `x` survives and nothing else is allocated."""
    m = x.max(dim=-1, keepdim=True).values
    torch.sub(x, m, out=scratch)
    if scale != 1.0:
        scratch.mul_(scale)
    scratch.exp_()
    return scratch.sum(-1).log() + m.squeeze(-1) * scale


class _FusedLinearLosses(torch.autograd.Function):
    """Per-position CE `[N]` and KL `[N]` (float32) of logits = hidden @ weight[:v].T, never all `[N, v]` at once.

    Forward: each chunk's logits give the losses and three per-position statistics (the logsumexp of the student's
    logits, of the student's logits / T, and of the teacher's / T), saved with references to the inputs. Backward:
    each chunk's logits are computed again and turned in place into
        dL/dlogits = g_ce * (softmax(s) - onehot(label)) + g_kd / T * (softmax(s / T) - p_teacher),
    which a matmul sends to the hidden states' gradient and another adds into a float32 `[V, H]` buffer.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, teacher_hidden, teacher_weight, ids, logprobs, vocab, temperature, chunk, gather
    ):
        n = hidden.shape[0]
        kind = "dense" if teacher_hidden is not None else "sparse" if ids is not None else None
        w = weight[:vocab]
        ce = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        kd = torch.zeros_like(ce)
        lse, lse_t, teacher_lse_t = torch.zeros_like(ce), torch.zeros_like(ce), torch.zeros_like(ce)
        valid = labels != IGNORE_INDEX
        label_ids = labels.clamp(min=0)
        log_p = sparse_valid = None
        if kind == "sparse":
            log_p, sparse_valid = _sparse_target(ids, logprobs, temperature)
        inv_t = 1.0 / temperature
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            s = _logits(hidden[sl], w)
            picked = s.gather(1, label_ids[sl, None]).squeeze(1)
            if kind is None:  # cross-entropy alone: s itself is the scratch
                lse[sl] = _row_lse(s, 1.0, s)
                ce[sl] = torch.where(valid[sl], lse[sl] - picked, 0.0)
                del s
                continue
            scratch = torch.empty_like(s)
            lse[sl] = _row_lse(s, 1.0, scratch)
            ce[sl] = torch.where(valid[sl], lse[sl] - picked, 0.0)
            lse_t[sl] = _row_lse(s, inv_t, scratch)
            if kind == "dense":
                t = _logits(teacher_hidden[sl], teacher_weight[:vocab])
                torch.sub(t, s, out=scratch)  # t - s; s is no longer needed
                del s
                teacher_lse_t[sl] = _row_lse(t, inv_t, t)  # t now holds exp((t - max) / T), summing to Z
                t.div_(t.sum(-1, keepdim=True))  # p
                # KL = sum p (t/T - lse_t(t)) - sum p (s/T - lse_t(s)) = sum p (t - s) / T + lse_t(s) - lse_t(t)
                cross = torch.bmm(t.unsqueeze(1), scratch.unsqueeze(2)).view(-1)
                kd[sl] = cross * inv_t + lse_t[sl] - teacher_lse_t[sl]
                del t
            elif kind == "sparse":
                log_q = s.gather(1, ids[sl].clamp(min=0)) * inv_t - lse_t[sl, None]
                lp = log_p[sl]
                kd[sl] = torch.where(sparse_valid[sl], lp.exp() * (lp - log_q), 0.0).sum(-1)
            del scratch
        ctx.kind, ctx.vocab, ctx.temperature, ctx.chunk, ctx.gather = kind, vocab, temperature, chunk, gather
        p_sparse = torch.where(sparse_valid, log_p.exp(), 0.0) if kind == "sparse" else None
        ctx.save_for_backward(
            hidden, weight, labels, lse, lse_t, teacher_lse_t, teacher_hidden, teacher_weight, ids, p_sparse
        )
        return ce, kd

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        with ctx.gather() if ctx.gather else contextlib.nullcontext():  # ZeRO-3: the head weights whole again
            return _FusedLinearLosses._backward(ctx, grad_ce, grad_kd)

    @staticmethod
    def _backward(ctx, grad_ce, grad_kd):
        hidden, weight, labels, lse, lse_t, teacher_lse_t, teacher_hidden, teacher_weight, ids, p_sparse = (
            ctx.saved_tensors
        )
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 11
        kind, vocab, temperature, chunk = ctx.kind, ctx.vocab, ctx.temperature, ctx.chunk
        inv_t = 1.0 / temperature
        n = hidden.shape[0]
        w = weight[:vocab]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_ce = torch.where(labels != IGNORE_INDEX, grad_ce.float(), 0.0)
        g_kd = grad_kd.float() * inv_t
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            s = _logits(hidden[sl], w)
            g = None
            if kind is not None:  # g_kd / T * (softmax(s / T) - p)
                g = torch.mul(s, inv_t).sub_(lse_t[sl, None]).exp_()
                if kind == "dense":
                    t = _logits(teacher_hidden[sl], teacher_weight[:vocab])
                    t.mul_(inv_t).sub_(teacher_lse_t[sl, None]).exp_()
                    g.sub_(t)
                    del t
                else:
                    g.scatter_add_(1, ids[sl].clamp(min=0), -p_sparse[sl])
                g.mul_(g_kd[sl, None])
            # g_ce * (softmax(s) - onehot(label)), in s's own storage
            s.sub_(lse[sl, None]).exp_()
            s.scatter_add_(1, labels[sl, None].clamp(min=0), torch.full_like(s[:, :1], -1.0))
            s.mul_(g_ce[sl, None])
            if g is not None:
                s.add_(g)
                del g
            g_in = s if hidden.dtype == torch.float32 else s.to(hidden.dtype)
            if need_h:
                grad_h[sl] = g_in @ w
            if need_w:
                if g_in.dtype == torch.float32 and hidden.dtype == torch.float32:
                    grad_w[:vocab].addmm_(g_in.T, hidden[sl])
                else:  # low precision: the product in the inputs' dtype, summed in float32
                    grad_w[:vocab].add_(g_in.T @ hidden[sl])
            del s, g_in
        if grad_w is not None and weight.dtype != torch.float32:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _check_inputs(hidden, weight, labels, token_weights, teacher) -> int:
    """The vocabulary size compared; a clear error for any shape that does not fit."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        got = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {got}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}]; got {tuple(labels.shape)}")
    if token_weights is not None and token_weights.shape != (n,):
        raise ValueError(f"token_weights must be [N] = [{n}]; got {tuple(token_weights.shape)}")
    if isinstance(teacher, DenseTeacher):
        th, tw = teacher.hidden, teacher.weight
        if th.dim() != 2 or tw.dim() != 2 or th.shape[0] != n or th.shape[1] != tw.shape[1]:
            got = f"{tuple(th.shape)} and {tuple(tw.shape)}"
            raise ValueError(f"DenseTeacher needs hidden [N={n}, Ht] and weight [Vt, Ht]; got {got}")
        vocab = min(vocab, tw.shape[0])
    elif isinstance(teacher, SparseTeacher):
        ids, lp = teacher.token_ids, teacher.logprobs
        if ids.dim() != 2 or ids.shape[0] != n or lp.shape != ids.shape:
            raise ValueError(
                f"SparseTeacher needs token_ids and logprobs [N={n}, K]; got {tuple(ids.shape)} and {tuple(lp.shape)}"
            )
        if ids.dtype != torch.int64:
            raise ValueError(f"SparseTeacher.token_ids must be int64; got {ids.dtype}")
        if ids.numel() and int(ids.max()) >= vocab:
            row = int((ids >= vocab).any(-1).nonzero()[0])
            raise ValueError(
                f"SparseTeacher.token_ids at position {row} has id {int(ids[row].max())}, beyond the student's "
                f"vocabulary of {vocab}: teacher and student must share the tokenizer"
            )
    elif teacher is not None:
        raise TypeError(f"teacher must be a DenseTeacher, a SparseTeacher or None; got {type(teacher).__name__}")
    if labels.numel() and int(labels.max()) >= vocab:
        raise ValueError(f"labels hold id {int(labels.max())}, beyond the compared vocabulary of {vocab}")
    return vocab


def _fused(hidden, weight, labels, teacher, temperature, chunk_size, vocab, gather=None):
    chunk = chunk_size or default_chunk_size(vocab)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk}")
    dense = teacher if isinstance(teacher, DenseTeacher) else None
    sparse = teacher if isinstance(teacher, SparseTeacher) else None
    return _FusedLinearLosses.apply(
        hidden,
        weight,
        labels,
        dense.hidden.detach() if dense else None,
        dense.weight.detach() if dense else None,
        sparse.token_ids if sparse else None,
        sparse.logprobs.detach() if sparse else None,
        vocab,
        float(temperature),
        int(chunk),
        gather,
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-position cross-entropy `[N]` (float32) of logits hidden @ weight.T, chunk by chunk: the same numbers and
    gradients as F.cross_entropy(hidden @ weight.T, labels, reduction="none"), label -100 scoring 0."""
    vocab = _check_inputs(hidden, weight, labels, None, None)
    return _fused(hidden, weight, labels, None, 1.0, chunk_size, vocab)[0]


def chunked_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    alpha: float = 0.0,
    temperature: float = 1.0,
    total_weight: torch.Tensor | float | None = None,
    teacher: DenseTeacher | SparseTeacher | None = None,
    chunk_size: int | None = None,
    gather: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`distillation_loss(hidden @ weight.T, teacher logits, ...)` from the final hidden states `[N, H]` and the
    lm_head weight `[V, H]`, without the `[N, V]` logits: (loss, ce, kd), kd None without a teacher or with alpha 0.

    A DenseTeacher is compared over the first min(V, Vt) rows, and the cross-entropy is taken over those rows too,
    exactly as the trainer cuts full logits; a SparseTeacher is compared with `sparse_kl_teacher_student`.
    `gather`: a context in which the weights are whole (DeepSpeed ZeRO-3 partitions them outside their module's
    forward); the caller holds it around this call, and the backward's recomputation enters it again.
    """
    vocab = _check_inputs(hidden, weight, labels, token_weights, teacher)
    use_kd = teacher is not None and alpha != 0
    ce_t, kd_t = _fused(hidden, weight, labels, teacher if use_kd else None, temperature, chunk_size, vocab, gather)
    ce = weighted_mean(ce_t, token_weights, total_weight)
    if not use_kd:
        return ce, ce, None
    kd = weighted_mean(kd_t, token_weights, total_weight)
    return alpha * temperature**2 * kd + (1 - alpha) * ce, ce, kd
