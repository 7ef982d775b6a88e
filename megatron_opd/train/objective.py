"""The student's per-micro-batch objective on the last pipeline stage, and its metrics.

Returns megatron's per-token loss triple ``(loss_sum, num_tokens, metrics)``: the schedule sums
over micro-batches and megatron divides gradients by the loss tokens of the whole global batch.
"""

from __future__ import annotations

import torch

from megatron_opd.config import LossConfig
from megatron_opd.losses import sampled_token_reverse_kl, token_logprobs, topk_logprobs, vocab_parallel_divergence
from megatron_opd.train.teacher import TeacherSignal

OVERLAP_K = 8  # top-k used for the teacher/student overlap metric


def teacher_need(loss: LossConfig) -> str:
    """What the loss needs from the teacher: full logits, top-k, or log-probs of sampled tokens."""
    if loss.kind == "sampled_reverse_kl":
        return "token"
    if loss.support == "teacher_topk_input":
        return "topk"
    return "logits"


def micro_batch_loss(logits: torch.Tensor, batch: dict, signal: TeacherSignal, *, loss: LossConfig,
                     vocab_size: int, tp_group, rollout_temperature: float, teacher_temperature: float):
    """``logits``: the student's ``[1, L, V/TP]`` shard for one packed micro-batch."""
    z = logits[0]
    mask = batch["loss_mask"][0]
    weights = batch["weights"][0]
    targets = batch["targets"][0].clamp(0, vocab_size - 1)
    chunk = loss.chunk_size or None
    common = dict(vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk)
    metrics = {}
    if loss.kind == "sampled_reverse_kl":
        t_lp = signal.token_logprobs.to(z.device)
        per_tok_kl = sampled_token_reverse_kl(z, targets, t_lp, temperature=loss.temperature,
                                              loss_mask=mask, **common)
        # On-policy distillation as RL: the negative sampled reverse KL is a per-token advantage
        # for the policy gradient; its value is the divergence estimate.
        student_lp = per_tok_kl + t_lp
        advantage = -per_tok_kl.detach()
        per_tok = -advantage * student_lp
        divergence = per_tok_kl.detach()
    else:
        kind = loss.kind
        if signal.logits is not None:
            t_logits = signal.logits.to(z.device)
            if teacher_temperature != loss.temperature:
                # the loss divides both sides by loss.temperature; the teacher needs its own
                t_logits = t_logits * (loss.temperature / teacher_temperature)
            per_tok = vocab_parallel_divergence(z, t_logits, kind=kind, beta=loss.beta,
                                                temperature=loss.temperature, loss_mask=mask,
                                                support=loss.support, top_k=loss.top_k or None, **common)
        else:
            per_tok = vocab_parallel_divergence(z, None, kind=kind, beta=loss.beta,
                                                temperature=loss.temperature, loss_mask=mask,
                                                support="teacher_topk", top_k=loss.top_k,
                                                teacher_topk_ids=signal.topk_ids.to(z.device),
                                                teacher_topk_logprobs=signal.topk_logprobs.to(z.device),
                                                **common)
        divergence = per_tok.detach()
    loss_sum = (per_tok * weights * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    with torch.no_grad():
        metrics["divergence_sum"] = (divergence * mask).sum()
        metrics["loss_tokens"] = mask.sum()
        # Trainer-vs-rollout agreement on the on-policy sampled tokens.
        onp = mask * batch["on_policy"][0]
        if onp.sum() > 0:
            lp = token_logprobs(z.detach(), targets, temperature=rollout_temperature, **common)
            diff = (lp - batch["rollout_logprobs"][0]).abs() * onp
            metrics["mismatch_max"] = diff.max()
            metrics["mismatch_sum"] = diff.sum()
            metrics["mismatch_tokens"] = onp.sum()
        if signal.logits is not None or signal.topk_ids is not None:
            k = OVERLAP_K if signal.topk_ids is None else signal.topk_ids.shape[-1]
            s_ids, _ = topk_logprobs(z.detach(), k, vocab_size=vocab_size, tp_group=tp_group)
            if signal.topk_ids is not None:
                t_ids = signal.topk_ids.to(z.device)
            else:
                t_ids, _ = topk_logprobs(signal.logits.to(z.device), k, vocab_size=vocab_size, tp_group=tp_group)
            overlap = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1).float().mean(-1)
            metrics["topk_overlap_sum"] = (overlap * mask).sum()
    return loss_sum, num_tokens, metrics
