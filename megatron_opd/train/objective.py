"""The student's per-micro-batch objective on the last pipeline stage, and its metrics.

Returns megatron's per-token loss triple ``(loss_sum, num_tokens, metrics)``: the schedule sums
over micro-batches and megatron divides gradients by the loss tokens of the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.config import LossConfig
from megatron_opd.losses import (fused_linear_divergence_sum, fused_linear_token_logprobs,
                                 fused_linear_topk_logprobs, sampled_token_reverse_kl, token_logprobs,
                                 topk_logprobs, vocab_parallel_divergence)
from megatron_opd.teacher.megatron import TeacherSignal

OVERLAP_K = 8  # top-k used for the teacher/student overlap metric


def teacher_need(loss: LossConfig) -> str:
    """What the loss needs from the teacher: full logits (final hidden states when the loss is fused
    with the output layers), top-k, or log-probs of sampled tokens."""
    if loss.kind == "sampled_reverse_kl":
        return "token"
    if loss.support == "teacher_topk_input":
        return "topk"
    return "hidden" if loss.fused_linear else "logits"


@dataclass(frozen=True)
class OutputHeads:
    """The output-layer weight shards a fused-linear loss multiplies final hidden states by."""

    student: torch.Tensor  # [V_padded/TP, h], the parameter itself: its gradient reaches megatron's DDP
    teacher: torch.Tensor | None = None  # [V_padded_teacher/TP, h_teacher], for teacher hidden states
    # False when a sequence-parallel gather's reduce-scatter sums the hidden-state gradient instead.
    reduce_hidden_grad: bool = True


def micro_batch_loss(output: torch.Tensor, batch: dict, signal: TeacherSignal, *, loss: LossConfig,
                     vocab_size: int, tp_group, rollout_temperature: float, teacher_temperature: float,
                     heads: OutputHeads | None = None):
    """``output``: the student's ``[1, L, V/TP]`` logits shard for one packed micro-batch; with
    ``heads`` (``loss.fused_linear``) its final hidden states ``[1, L, h]`` instead, which the
    losses multiply by ``heads.student`` a chunk of tokens at a time (the metrics too, without
    gradient)."""
    x = output[0]
    mask = batch["loss_mask"][0]
    weights = batch["weights"][0]
    targets = batch["targets"][0].clamp(0, vocab_size - 1)
    chunk = loss.chunk_size or None
    common = dict(vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk)
    fused = dict(reduce_hidden_grad=heads.reduce_hidden_grad) if heads is not None else {}
    metrics = {}
    if loss.kind == "sampled_reverse_kl":
        t_lp = signal.token_logprobs.to(x.device)
        if heads is None:
            per_tok_kl = sampled_token_reverse_kl(x, targets, t_lp, temperature=loss.temperature,
                                                  loss_mask=mask, **common)
        else:
            lp = fused_linear_token_logprobs(x, heads.student, targets, temperature=loss.temperature,
                                             **common, **fused)
            per_tok_kl = torch.where(mask != 0, lp - t_lp.to(lp.dtype), 0.0)
        # On-policy distillation as RL: the negative sampled reverse KL is a per-token advantage
        # for the policy gradient; its value is the divergence estimate.
        student_lp = per_tok_kl + t_lp
        advantage = -per_tok_kl.detach()
        per_tok = -advantage * student_lp
        divergence = per_tok_kl.detach()
        loss_sum = (per_tok * weights * mask).sum()
    else:
        kw = dict(kind=loss.kind, beta=loss.beta, temperature=loss.temperature, loss_mask=mask, **common)
        if signal.logits is None and signal.hidden is None:  # the teacher's top-k
            kw.update(support="teacher_topk", top_k=loss.top_k,
                      teacher_topk_ids=signal.topk_ids.to(x.device),
                      teacher_topk_logprobs=signal.topk_logprobs.to(x.device))
        else:
            kw.update(support=loss.support, top_k=loss.top_k or None)
        # The loss divides both sides by loss.temperature; the teacher needs its own (its logits
        # are linear in its hidden states).
        teacher_scale = loss.temperature / teacher_temperature
        if heads is None:
            t_logits = None if signal.logits is None else signal.logits.to(x.device)
            if t_logits is not None and teacher_scale != 1.0:
                t_logits = t_logits * teacher_scale
            per_tok = vocab_parallel_divergence(x, t_logits, **kw)
            loss_sum = (per_tok * weights * mask).sum()
        else:
            teacher = (None, None)
            if signal.hidden is not None:
                t_hidden = signal.hidden.to(x.device)
                teacher = (t_hidden * teacher_scale if teacher_scale != 1.0 else t_hidden, heads.teacher)
            # The summed loss: its gradients are computed with the value, no logits recomputed.
            loss_sum, per_tok = fused_linear_divergence_sum(x, heads.student, *teacher, token_weights=weights,
                                                            **kw, **fused)
        divergence = per_tok.detach()
    num_tokens = mask.sum().to(torch.int)
    with torch.no_grad():
        metrics["divergence_sum"] = (divergence * mask).sum()
        metrics["loss_tokens"] = mask.sum()
        # Trainer-vs-rollout agreement on the on-policy sampled tokens.
        onp = mask * batch["on_policy"][0]
        if onp.sum() > 0:
            if heads is None:
                lp = token_logprobs(x.detach(), targets, temperature=rollout_temperature, **common)
            else:
                lp = fused_linear_token_logprobs(x.detach(), heads.student.detach(), targets,
                                                 temperature=rollout_temperature, **common)
            diff = (lp - batch["rollout_logprobs"][0]).abs() * onp
            metrics["mismatch_max"] = diff.max()
            metrics["mismatch_sum"] = diff.sum()
            metrics["mismatch_tokens"] = onp.sum()
        if signal.logits is not None or signal.hidden is not None or signal.topk_ids is not None:
            k = OVERLAP_K if signal.topk_ids is None else signal.topk_ids.shape[-1]
            top = dict(vocab_size=vocab_size, tp_group=tp_group)
            if heads is None:
                s_ids, s_lps = topk_logprobs(x.detach(), k, **top)
            else:
                s_ids, s_lps = fused_linear_topk_logprobs(x.detach(), heads.student.detach(), k, **top)
            if signal.topk_ids is not None:
                t_ids, t_lps = signal.topk_ids.to(x.device), signal.topk_logprobs.to(x.device)
            elif signal.logits is not None:
                t_ids, t_lps = topk_logprobs(signal.logits.to(x.device), k, **top)
            else:
                t_ids, t_lps = fused_linear_topk_logprobs(signal.hidden.to(x.device), heads.teacher, k, **top)
            same = s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)  # [L, K student, K teacher]
            overlap = same.any(-1).float().mean(-1)
            # Probability mass both top-k distributions share: sum over common ids of min(p_s, p_t)
            # (1 when both put all their mass on the same k tokens in the same proportions).
            shared = torch.minimum(s_lps.float().exp().unsqueeze(-1), t_lps.float().exp().unsqueeze(-2))
            mass = (shared * same).sum((-1, -2))
            metrics["topk_overlap_sum"] = (overlap * mask).sum()
            metrics["topk_mass_overlap_sum"] = (mass * mask).sum()
    return loss_sum, num_tokens, metrics
