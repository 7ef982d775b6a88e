"""What a teacher gives the student's loss, per packed micro-batch, and the one protocol every
teacher (in process or served) follows."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_opd.models.builder import ShardedModel
from megatron_opd.parallel import ModelParallel


class Need(str, enum.Enum):
    """What the loss needs from the teacher."""

    LOGITS = "logits"  # its logit shards [L, V/TP] (a divergence over the full vocabulary or its top-k)
    HIDDEN = "hidden"  # its final hidden states [L, h] (the same, fused with the output layers)
    TOPK = "topk"      # its top-k ids and log-probs [L, K] (loss.support=teacher_topk_input)
    TOKEN = "token"    # its log-probs of the sampled tokens [L] (loss.kind=sampled_reverse_kl)


@dataclass
class TeacherSignal:
    """What the loss of one micro-batch gets from the teacher (the fields its :class:`Need` names)."""

    logits: torch.Tensor | None = None          # [L, V_local] (teacher's vocab shard)
    hidden: torch.Tensor | None = None          # [L, h] final hidden states (fused-linear losses)
    topk_ids: torch.Tensor | None = None        # [L, K]
    topk_logprobs: torch.Tensor | None = None   # [L, K]
    token_logprobs: torch.Tensor | None = None  # [L] of the micro-batch's targets


def teacher_tokens(micro_batch: dict) -> dict:
    """What the teacher scores of a micro-batch (``input_ids``, ``targets``, ``lengths``): the
    student's packed row, or, for a teacher with its own tokenizer, the same sequences in its
    tokenization packed in the same order (``micro_batch["teacher_tokens"]``)."""
    return micro_batch.get("teacher_tokens", micro_batch)


class Teacher(Protocol):
    """A teacher scores the student's packed micro-batches. Collective: every rank of the job
    calls its methods at the same point."""

    need: Need
    model: ShardedModel | None  # the teacher's megatron model, when it runs in this job

    def signals(self, micro_batches: list[dict], student: ModelParallel) -> list[TeacherSignal | None]:
        """One signal per micro-batch of this student replica (the same micro-batches on every
        rank of the replica): real on the student's last pipeline stage, None elsewhere."""
        ...

    def output_weight(self, student: ModelParallel) -> torch.Tensor | None:
        """For a loss fused with the output layers (``Need.HIDDEN``): the teacher's output-layer
        weight shard matching this rank's student vocabulary shard, on the student's last stage;
        None elsewhere."""
        ...

    def close(self) -> None:
        ...
