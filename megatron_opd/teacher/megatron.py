"""The in-process teacher: score every student micro-batch with a megatron model and deliver what
the loss needs (logit shards, final hidden states for a loss fused with the output layer, top-k,
or log-probs of the sampled tokens) to the student's last stage.

It is a megatron model on process groups of its own (its own TP/PP/DP, no DDP
or optimizer state). It scores the micro-batches of *all* student replicas, split over its own
replicas, and each result travels point to point to the student ranks that compute the loss for
it. Full-vocabulary signals need teacher TP == student TP (rank r's shard goes to student TP rank
r). Signals are kept on the CPU between the phases: each result moves to the host once, where the
teacher's schedule produces it, and travels between ranks on the compute device (NCCL sends only
device tensors), one message at a time. For a fused-linear loss the teacher sends its
final hidden states ``[L, h]`` instead of its logits ``[L, V/TP]`` (h << V/TP), and each student
last-stage rank receives the teacher's output-layer weight shard once (:meth:`MegatronTeacher.output_weight`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.checkpoint.load import load_model
from megatron_opd.losses import token_logprobs, topk_logprobs
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.packing import packed_inputs, row_padding, token_multiple
from megatron_opd.models import schedule
from megatron_opd.parallel import ModelParallel, ParallelLayout
from megatron_opd.teacher.signals import Need, TeacherSignal, teacher_tokens

# The fields of a TeacherSignal each need fills.
SIGNAL_FIELDS = {Need.LOGITS: ("logits",), Need.HIDDEN: ("hidden",), Need.TOPK: ("topk_ids", "topk_logprobs"),
                 Need.TOKEN: ("token_logprobs",)}


def _wire(mb: dict) -> dict:
    """The part of a micro-batch the teacher scores, as plain CPU data (its own tokenization's, when it
    has its own tokenizer: then its results have the length of its row)."""
    mine = teacher_tokens(mb)
    return {"input_ids": mine["input_ids"].cpu(), "targets": mine["targets"].cpu(), "lengths": mine["lengths"],
            "padding": mine.get("padding", 0)}


def _unwire(w: dict, device, multiple_of: int) -> dict:
    """The student's packed THD row as the teacher runs it: the same sequences, and padding (a
    sequence of its own, at the end) to the teacher's token multiple; ``length`` is the student's
    row length, which the teacher's outputs are cut back to."""
    length = w["input_ids"].shape[1]
    padding = w["padding"] + row_padding(length, multiple_of)
    extra = padding - w["padding"]
    mb = {key: torch.nn.functional.pad(w[key], (0, extra)).to(device) for key in ("input_ids", "targets")}
    mb.update(packed_inputs(w["lengths"], device=device, padding=padding), length=length)
    return mb


def exchange_micro_batches(my_micro_batches: list[dict], student: ModelParallel) -> list[tuple[int, int, dict]]:
    """Every student replica's micro-batches, known everywhere (token ids only: small), as
    ``(student dp rank, index in the replica, wire)`` in that order. Collective over the world."""
    share = (student.dp_rank, [_wire(mb) for mb in my_micro_batches]) \
        if dist.get_rank(student.mp_group) == 0 else None
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, share)
    work = []
    for item in everything:
        if item is not None:
            d, mbs = item
            work.extend((d, i, w) for i, w in enumerate(mbs))
    work.sort(key=lambda x: (x[0], x[1]))
    return work


class MegatronTeacher:
    """A frozen megatron teacher on its own process groups. Collective: every rank builds it."""

    def __init__(self, model: ShardedModel, *, need: Need, top_k: int = 0, temperature: float = 1.0):
        """``model``: the teacher, built on process groups of its own (``model.mp``)."""
        self.mp: ModelParallel = model.mp
        self.model = model
        self.model.module.eval()
        for p in self.model.module.parameters():
            p.requires_grad_(False)
        self.need, self.top_k, self.temperature = need, top_k, temperature
        self.arch = self.model.arch

    @classmethod
    def load(cls, path: str, layout: ParallelLayout, *, need: Need, top_k: int = 0, temperature: float = 1.0,
             seed: int = 1234, params_dtype: torch.dtype = torch.float32) -> "MegatronTeacher":
        """The teacher at ``path`` (HF or megatron_opd checkpoint) on fresh groups for ``layout``."""
        mp = parallel.build_model_parallel(layout, what="teacher")
        return cls(load_model(path, mp, seed=seed, params_dtype=params_dtype), need=need, top_k=top_k,
                   temperature=temperature)

    @torch.no_grad()
    def signals(self, my_micro_batches: list[dict], student: ModelParallel) -> list[TeacherSignal | None]:
        """Teacher signals for this student replica's micro-batches; real on the student's last
        stage (None elsewhere). Collective over the whole world."""
        device = parallel.device()
        work = exchange_micro_batches(my_micro_batches, student)
        tmp = self.mp
        mine = [k for k in range(len(work)) if k % tmp.dp_size == tmp.dp_rank]
        multiple = token_multiple(self.model.config)
        mbs = [_unwire(work[k][2], device, multiple) for k in mine]
        if self.mp.layout.ep > 1 and work:
            # Expert-parallel peers sit in different teacher replicas: every replica runs as many
            # forwards as the busiest, the others repeating a micro-batch whose output is dropped.
            busiest = -(-len(work) // tmp.dp_size)
            mbs += [_unwire(work[0][2], device, multiple)] * (busiest - len(mbs))
        vocab = self.arch.vocab_size

        def output_fn(output, mb):
            z = output[0, :mb["length"]]  # the student's row (without the teacher's own padding)
            out = {}
            if self.need == Need.LOGITS:
                out["logits"] = z.detach().to("cpu", copy=True)
            if self.need == Need.HIDDEN:
                hidden = schedule.gather_sequence_parallel(output, self.model)[0, :mb["length"]]
                out["hidden"] = hidden.to("cpu", copy=True)
            if self.need == Need.TOPK:
                ids, lps = topk_logprobs(z, self.top_k, vocab_size=vocab, tp_group=tmp.tp_group,
                                         temperature=self.temperature)
                out["topk_ids"], out["topk_logprobs"] = ids.cpu(), lps.cpu()
            if self.need == Need.TOKEN:
                targets = mb["targets"][0, :mb["length"]].clamp(0, vocab - 1)
                out["token_logprobs"] = token_logprobs(z, targets, vocab_size=vocab, tp_group=tmp.tp_group,
                                                       temperature=self.temperature).cpu()
            return out

        hidden = schedule.final_hidden_states(self.model) if self.need == Need.HIDDEN else contextlib.nullcontext()
        with hidden:
            results = schedule.run_schedule(self.model, mbs, output_fn, forward_only=True) if mbs else []
        produced = dict(zip(mine, results)) if tmp.is_last_stage else {}
        return self._deliver(work, produced, student)

    @torch.no_grad()
    def output_weight(self, student: ModelParallel) -> torch.Tensor | None:
        """The teacher's output-layer weight shard ``[V_padded_teacher/TP, h]`` that matches this
        rank's student vocab shard (teacher TP rank = student TP rank), on the student's last
        stage; None elsewhere. Collective over the whole world; a one-time transfer for a loss
        fused with the output layers (the teacher is frozen)."""
        tmp = self.mp
        if tmp.layout.tp != student.layout.tp:
            raise ValueError(f"a fused-linear loss over the full vocabulary needs teacher.tp == student.tp, "
                             f"got {tmp.layout.tp} and {student.layout.tp}")
        me = dist.get_rank()
        t_last, s_last = tmp.layout.pp - 1, student.layout.pp - 1
        mine = None
        for d in range(student.dp_size):
            for r in range(student.layout.tp):
                dst = student.global_rank(tp_rank=r, pp_rank=s_last, dp_rank=d)
                src = tmp.global_rank(tp_rank=r, pp_rank=t_last, dp_rank=d % tmp.dp_size)
                if me == src:
                    weight = schedule.output_weight(self.model).detach()
                    if me == dst:
                        mine = weight
                    else:
                        dist.send(weight.contiguous(), dst=dst)
                elif me == dst:
                    config = self.model.config
                    mine = torch.empty(self.model.padded_vocab_size // tmp.layout.tp, config.hidden_size,
                                       dtype=config.params_dtype, device=parallel.device())
                    dist.recv(mine, src=src)
        return mine

    def _deliver(self, work, produced: dict, student: ModelParallel) -> list[TeacherSignal | None]:
        """Move each result from the teacher rank that made it to the student ranks that need it."""
        tmp = self.mp
        me = dist.get_rank()
        t_last = tmp.layout.pp - 1
        s_last = student.layout.pp - 1
        mine: list[TeacherSignal | None] = []
        my_count = sum(1 for d, _, _ in work if d == student.dp_rank)
        if student.is_last_stage:
            mine = [TeacherSignal() for _ in range(my_count)]
        keys = SIGNAL_FIELDS[self.need]
        for k, (d, i, w) in enumerate(work):
            e = k % tmp.dp_size
            L = w["input_ids"].shape[1]
            for r in range(student.layout.tp):
                dst = student.global_rank(tp_rank=r, pp_rank=s_last, dp_rank=d)
                # Full logits: teacher TP rank r holds the shard student TP rank r needs (hidden
                # states are the same on every teacher TP rank: spread the sends the same way).
                src_tp = r if self.need in (Need.LOGITS, Need.HIDDEN) else 0
                src = tmp.global_rank(tp_rank=src_tp, pp_rank=t_last, dp_rank=e)
                if me != src and me != dst:
                    continue
                if me == src:
                    out = produced[k]
                    tensors = [out[key] for key in keys]
                if me == dst and me != src:
                    tensors = [self._empty(key, L) for key in keys]
                    for t in tensors:
                        dist.recv(t, src=src)
                    tensors = [t.cpu() for t in tensors]
                elif me == src and me != dst:
                    for t in tensors:
                        dist.send(t.to(parallel.device()).contiguous(), dst=dst)
                if me == dst:
                    for key, t in zip(keys, tensors):
                        setattr(mine[i], key, t)
        return mine

    def _empty(self, key: str, L: int) -> torch.Tensor:
        """A receive buffer for ``key`` on the compute device."""
        config = self.model.config
        shape, dtype = {
            "logits": ((L, self.model.padded_vocab_size // self.mp.layout.tp), config.params_dtype),
            "hidden": ((L, config.hidden_size), config.params_dtype),
            "topk_ids": ((L, self.top_k), torch.long),
            "topk_logprobs": ((L, self.top_k), torch.float32),
            "token_logprobs": ((L,), torch.float32),
        }[key]
        return torch.empty(shape, dtype=dtype, device=parallel.device())

    def close(self) -> None:
        """Nothing to release: the model and its groups live as long as the process."""
