"""The student's objective on the last pipeline stage: the loss of one packed micro-batch against
its teacher signal, and the metrics that watch it.

An :class:`Objective` is built once from the ``loss`` config section. It pairs a loss (a divergence
over a support, or the sampled-token estimate of reverse KL) with a head that says what the student
hands over: its logits shard, or (``loss.fused_linear``) its final hidden states, which the losses
multiply by the output-layer weight a chunk of tokens at a time. Called per micro-batch it returns
megatron's per-token loss triple ``(loss_sum, num_tokens, metrics)``: the schedule sums over
micro-batches and megatron divides gradients by the loss tokens of the whole global batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megatron_opd.losses import (fused_linear_divergence_sum, fused_linear_token_logprobs,
                                 fused_linear_topk_logprobs, sampled_token_reverse_kl, token_logprobs,
                                 topk_logprobs, vocab_parallel_divergence)
from megatron_opd.losses.cross_tokenizer import span_reverse_kl
from megatron_opd.losses.divergence import SUPPORTS as DIVERGENCE_SUPPORTS
from megatron_opd.losses.kinds import KINDS as DIVERGENCE_KINDS
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.schedule import final_hidden_states, gather_sequence_parallel, output_weight
from megatron_opd.teacher.signals import Need, TeacherSignal
from megatron_opd.train.alignment import PackedAlignment

# loss.kind: a divergence over a support, or the sampled-token log-ratio as a per-token advantage.
SAMPLED_REVERSE_KL = "sampled_reverse_kl"
KINDS = DIVERGENCE_KINDS + (SAMPLED_REVERSE_KL,)
# loss.support: one of the divergences' own, or the teacher's top-k as sent by the teacher.
TEACHER_TOPK_INPUT = "teacher_topk_input"
SUPPORTS = DIVERGENCE_SUPPORTS + (TEACHER_TOPK_INPUT,)
OVERLAP_K = 8  # top-k used for the teacher/student overlap metric
# loss.cross_tokenizer: a teacher with the student's token ids, or with its own tokenizer (the span-level
# sampled reverse KL over the text both tokenizations cover: losses/cross_tokenizer.py).
CROSS_TOKENIZER = ("none", "span")


def teacher_need(*, kind: str, support: str, fused_linear: bool) -> Need:
    """What the loss needs from the teacher: full logits (final hidden states when the loss is fused
    with the output layers), top-k, or log-probs of sampled tokens."""
    if kind == SAMPLED_REVERSE_KL:
        return Need.TOKEN
    if support == TEACHER_TOPK_INPUT:
        return Need.TOPK
    return Need.HIDDEN if fused_linear else Need.LOGITS


@dataclass(frozen=True)
class Tokens:
    """A micro-batch's per-token inputs to the loss, each ``[L]``."""

    mask: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor  # clamped into the vocabulary (masked positions may hold anything)
    on_policy: torch.Tensor  # 1 where the token was sampled by the rollout engine
    rollout_logprobs: torch.Tensor  # the engine's log-prob of it (0 elsewhere)
    alignment: PackedAlignment | None = None  # a teacher with its own tokenizer: the spans of the rows

    @classmethod
    def of(cls, batch: dict, vocab_size: int) -> Tokens:
        return cls(batch["loss_mask"][0], batch["weights"][0], batch["targets"][0].clamp(0, vocab_size - 1),
                   batch["on_policy"][0], batch["rollout_logprobs"][0], batch.get("alignment"))


# ---------------------------------------------------------------- heads: what the student hands over

class Head:
    """What the student's last stage hands the loss, and how log-probs are taken from it."""

    def __init__(self, *, vocab_size: int, tp_group, chunk_size: int | None):
        self.vocab_size, self.tp_group = vocab_size, tp_group
        self.common = dict(vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)


class LogitsHead(Head):
    """The student's output is its logits shard ``[1, L, V/TP]``; a teacher sends logits too."""

    def outputs(self):
        """Within: the model returns what this head reads (logits: nothing to change)."""
        return contextlib.nullcontext()

    def prepare(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def sampled_kl(self, x, targets, teacher_lp, *, temperature: float, mask) -> torch.Tensor:
        return sampled_token_reverse_kl(x, targets, teacher_lp, temperature=temperature, loss_mask=mask,
                                        **self.common)

    def divergence_sum(self, x, signal: TeacherSignal, weights, *, teacher_scale: float, **kw):
        """(sum of weights * D over the unmasked tokens, D) against the teacher's logits."""
        t_logits = None if signal.logits is None else signal.logits.to(x.device)
        if t_logits is not None and teacher_scale != 1.0:
            t_logits = t_logits * teacher_scale
        per_tok = vocab_parallel_divergence(x, t_logits, **kw, **self.common)
        return (per_tok * weights * kw["loss_mask"]).sum(), per_tok

    def token_logprobs(self, x, targets, *, temperature: float) -> torch.Tensor:
        return token_logprobs(x.detach(), targets, temperature=temperature, **self.common)

    def topk(self, x, k: int):
        return topk_logprobs(x.detach(), k, vocab_size=self.vocab_size, tp_group=self.tp_group)

    def teacher_topk(self, signal: TeacherSignal, k: int, device):
        return topk_logprobs(signal.logits.to(device), k, vocab_size=self.vocab_size, tp_group=self.tp_group)


class FusedHead(Head):
    """The student's output is its final hidden states ``[1, L, h]``, which the losses multiply by
    the output-layer weight shards chunk by chunk (the metrics too, without gradient); a teacher
    sends its final hidden states, multiplied by its own output-layer shard."""

    def __init__(self, model: ShardedModel, teacher_weight: torch.Tensor | None, *, vocab_size: int, tp_group,
                 chunk_size: int | None):
        super().__init__(vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)
        self.model = model
        # [V_padded/TP, h], the parameter itself: its gradient reaches megatron's DDP
        self.student_weight = output_weight(model) if model.mp.is_last_stage else None
        self.teacher_weight = teacher_weight  # [V_padded_teacher/TP, h_teacher]
        # False when a sequence-parallel gather's reduce-scatter sums the hidden-state gradient instead.
        self.fused = dict(reduce_hidden_grad=not model.config.sequence_parallel)

    def outputs(self):
        return final_hidden_states(self.model)

    def prepare(self, output: torch.Tensor) -> torch.Tensor:
        return gather_sequence_parallel(output, self.model)

    def sampled_kl(self, x, targets, teacher_lp, *, temperature: float, mask) -> torch.Tensor:
        lp = fused_linear_token_logprobs(x, self.student_weight, targets, temperature=temperature, **self.common,
                                         **self.fused)
        return torch.where(mask != 0, lp - teacher_lp.to(lp.dtype), 0.0)

    def divergence_sum(self, x, signal: TeacherSignal, weights, *, teacher_scale: float, **kw):
        teacher = (None, None)
        if signal.hidden is not None:
            t_hidden = signal.hidden.to(x.device)
            teacher = (t_hidden * teacher_scale if teacher_scale != 1.0 else t_hidden, self.teacher_weight)
        # The summed loss: its gradients are computed with the value, no logits recomputed.
        return fused_linear_divergence_sum(x, self.student_weight, *teacher, token_weights=weights, **kw,
                                           **self.common, **self.fused)

    def token_logprobs(self, x, targets, *, temperature: float) -> torch.Tensor:
        return fused_linear_token_logprobs(x.detach(), self.student_weight.detach(), targets,
                                           temperature=temperature, **self.common)

    def topk(self, x, k: int):
        return fused_linear_topk_logprobs(x.detach(), self.student_weight.detach(), k, vocab_size=self.vocab_size,
                                          tp_group=self.tp_group)

    def teacher_topk(self, signal: TeacherSignal, k: int, device):
        return fused_linear_topk_logprobs(signal.hidden.to(device), self.teacher_weight, k,
                                          vocab_size=self.vocab_size, tp_group=self.tp_group)


# ---------------------------------------------------------------- losses: (loss_sum, divergence)

class SampledReverseKLLoss:
    """On-policy distillation as RL: the negative sampled-token log-ratio log p_s(y) - log p_t(y) is
    a per-token advantage for the policy gradient; its value is the divergence estimate.

    With ``importance_cap`` (truncated importance sampling), each token the rollout engine sampled is
    weighted by ``min(pi_trainer(y) / pi_rollout(y), cap)``, both at the rollout temperature: the
    policy gradient is of the trainer's distribution, the samples come from the engine's, and the two
    differ by the engine's kernels and, in bf16, by rounding. Tokens not sampled by the engine
    (dataset or teacher completions) keep weight 1."""

    def __init__(self, *, temperature: float, importance_cap: float | None = None,
                 rollout_temperature: float = 1.0):
        if importance_cap is not None and not importance_cap >= 1.0:
            raise ValueError(f"importance_cap must be >= 1, got {importance_cap}")
        self.temperature, self.importance_cap, self.rollout_temperature = temperature, importance_cap, rollout_temperature

    def __call__(self, head: Head, x, tokens: Tokens, signal: TeacherSignal):
        t_lp = signal.token_logprobs.to(x.device)
        per_tok_kl = head.sampled_kl(x, tokens.targets, t_lp, temperature=self.temperature, mask=tokens.mask)
        student_lp = per_tok_kl + t_lp
        advantage = -per_tok_kl.detach()
        per_tok = -advantage * student_lp
        if self.importance_cap is not None:
            per_tok = per_tok * self.importance_weights(head, x, tokens, student_lp)
        return (per_tok * tokens.weights * tokens.mask).sum(), per_tok_kl.detach()

    @torch.no_grad()
    def importance_weights(self, head: Head, x, tokens: Tokens, student_lp: torch.Tensor) -> torch.Tensor:
        if self.temperature == self.rollout_temperature:
            trainer_lp = student_lp.detach()
        else:
            trainer_lp = head.token_logprobs(x, tokens.targets, temperature=self.rollout_temperature)
        ratio = torch.exp(trainer_lp.float() - tokens.rollout_logprobs.float()).clamp(max=self.importance_cap)
        return torch.where(tokens.on_policy > 0, ratio, torch.ones_like(ratio))


class SpanReverseKLLoss(SampledReverseKLLoss):
    """:class:`SampledReverseKLLoss` for a teacher with its own tokenizer: the log-ratio is taken per
    span of text that is whole tokens on both sides (the student's tokens' log-probs against the
    teacher's over the same text, :func:`~megatron_opd.losses.cross_tokenizer.span_reverse_kl`) and
    is the advantage of each student token of the span. Tokens in no aligned span get no gradient;
    the divergence is each span's log-ratio spread over its student tokens. With one token per side
    in every span it is :class:`SampledReverseKLLoss` exactly."""

    def __call__(self, head: Head, x, tokens: Tokens, signal: TeacherSignal):
        a = tokens.alignment
        if a is None:
            raise ValueError("loss.cross_tokenizer=span: the micro-batch has no alignment to the teacher's tokens")
        sig = span_reverse_kl(x, tokens.targets, signal.token_logprobs.to(x.device), student_span=a.student_row_span,
                              teacher_span=a.teacher_row_span, num_spans=a.num_spans, loss_mask=tokens.mask,
                              temperature=self.temperature, **head.common)
        per_tok = sig.loss
        if self.importance_cap is not None:
            student_lp = head.token_logprobs(x, tokens.targets, temperature=self.temperature)
            per_tok = per_tok * self.importance_weights(head, x, tokens, student_lp)
        return (per_tok * tokens.weights * tokens.mask).sum(), sig.divergence.detach()


class DivergenceLoss:
    """A divergence between the student's and the teacher's next-token distributions over a
    support; a teacher that sent only its top-k is compared on its top-k buckets."""

    def __init__(self, *, kind: str, beta: float, temperature: float, support: str, top_k: int,
                 teacher_temperature: float):
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.support, self.top_k = support, top_k
        # The loss divides both sides by loss.temperature; the teacher needs its own (its logits
        # are linear in its hidden states).
        self.teacher_scale = temperature / teacher_temperature

    def __call__(self, head: Head, x, tokens: Tokens, signal: TeacherSignal):
        kw = dict(kind=self.kind, beta=self.beta, temperature=self.temperature, loss_mask=tokens.mask)
        if signal.logits is None and signal.hidden is None:  # the teacher's top-k
            kw.update(support="teacher_topk", top_k=self.top_k, teacher_topk_ids=signal.topk_ids.to(x.device),
                      teacher_topk_logprobs=signal.topk_logprobs.to(x.device))
        else:
            kw.update(support=self.support, top_k=self.top_k or None)
        loss_sum, per_tok = head.divergence_sum(x, signal, tokens.weights, teacher_scale=self.teacher_scale, **kw)
        return loss_sum, per_tok.detach()


# ---------------------------------------------------------------- the objective

class Objective:
    """The loss of one micro-batch and its metrics: the divergence, the trainer-vs-rollout log-prob
    mismatch of the on-policy tokens, and the overlap of teacher and student top-k."""

    def __init__(self, loss, head: Head, *, rollout_temperature: float):
        self.loss, self.head, self.rollout_temperature = loss, head, rollout_temperature

    def outputs(self):
        """Within: the student returns what the objective reads (logits or final hidden states)."""
        return self.head.outputs()

    def __call__(self, output: torch.Tensor, batch: dict, signal: TeacherSignal):
        x = self.head.prepare(output)[0]
        tokens = Tokens.of(batch, self.head.vocab_size)
        loss_sum, divergence = self.loss(self.head, x, tokens, signal)
        num_tokens = tokens.mask.sum().to(torch.int)
        metrics = self._metrics(x, batch, tokens, signal, divergence)
        metrics["loss_sum"] = loss_sum.detach().clone()
        return loss_sum, num_tokens, metrics

    @torch.no_grad()
    def _metrics(self, x, batch: dict, tokens: Tokens, signal: TeacherSignal, divergence) -> dict:
        mask = tokens.mask
        metrics = {"divergence_sum": (divergence * mask).sum(), "loss_tokens": mask.sum()}
        if tokens.alignment is not None:  # trained tokens each cross-tokenizer objective covers
            covered = tokens.alignment.coverage(mask)
            metrics.update(xtok_span_tokens=covered["span"], xtok_tokens=covered["tokens"])
        # Trainer-vs-rollout agreement on the on-policy sampled tokens.
        onp = mask * batch["on_policy"][0]
        if onp.sum() > 0:
            lp = self.head.token_logprobs(x, tokens.targets, temperature=self.rollout_temperature)
            diff = (lp - batch["rollout_logprobs"][0]).abs() * onp
            metrics.update(mismatch_max=diff.max(), mismatch_sum=diff.sum(), mismatch_tokens=onp.sum())
        teacher_ids = signal.logits is not None or signal.hidden is not None or signal.topk_ids is not None
        if teacher_ids and tokens.alignment is None:  # another tokenizer's ids are not the student's
            overlap, mass = self._topk_overlap(x, signal)
            metrics.update(topk_overlap_sum=(overlap * mask).sum(), topk_mass_overlap_sum=(mass * mask).sum())
        return metrics

    def _topk_overlap(self, x, signal: TeacherSignal):
        """Per token: the fraction of the student's top-k ids the teacher's top-k holds, and the
        probability mass both share (sum over common ids of min(p_s, p_t); 1 when both put all
        their mass on the same k tokens in the same proportions)."""
        k = OVERLAP_K if signal.topk_ids is None else signal.topk_ids.shape[-1]
        s_ids, s_lps = self.head.topk(x, k)
        if signal.topk_ids is not None:
            t_ids, t_lps = signal.topk_ids.to(x.device), signal.topk_logprobs.to(x.device)
        else:
            t_ids, t_lps = self.head.teacher_topk(signal, k, x.device)
        same = s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)  # [L, K student, K teacher]
        overlap = same.any(-1).float().mean(-1)
        shared = torch.minimum(s_lps.float().exp().unsqueeze(-1), t_lps.float().exp().unsqueeze(-2))
        return overlap, (shared * same).sum((-1, -2))


def make_objective(student: ShardedModel, *, kind: str, beta: float, support: str, top_k: int,
                   temperature: float, chunk_size: int | None, fused_linear: bool,
                   teacher_output_weight: torch.Tensor | None, teacher_temperature: float,
                   rollout_temperature: float, importance_cap: float | None = None,
                   cross_tokenizer: str = "none") -> Objective:
    """The objective of the ``loss`` config section for ``student`` (see :meth:`LossConfig.build`)."""
    common = dict(vocab_size=student.arch.vocab_size, tp_group=student.mp.tp_group, chunk_size=chunk_size)
    head = FusedHead(student, teacher_output_weight, **common) if fused_linear else LogitsHead(**common)
    if cross_tokenizer == "span":
        loss = SpanReverseKLLoss(temperature=temperature, importance_cap=importance_cap,
                                 rollout_temperature=rollout_temperature)
    elif kind == SAMPLED_REVERSE_KL:
        loss = SampledReverseKLLoss(temperature=temperature, importance_cap=importance_cap,
                                    rollout_temperature=rollout_temperature)
    else:
        loss = DivergenceLoss(kind=kind, beta=beta, temperature=temperature, support=support, top_k=top_k,
                          teacher_temperature=teacher_temperature)
    return Objective(loss, head, rollout_temperature=rollout_temperature)
