"""The teacher phase: score every student micro-batch with the teacher and deliver what the loss
needs (logit shards, final hidden states for a loss fused with the output layer, top-k, or
log-probs of the sampled tokens) to the student's last stage.

An in-process teacher is a megatron model on process groups of its own (its own TP/PP/DP, no DDP
or optimizer state). It scores the micro-batches of *all* student replicas, split over its own
replicas, and each result travels point to point to the student ranks that compute the loss for
it. Full-vocabulary signals need teacher TP == student TP (rank r's shard goes to student TP rank
r). Signals are kept on the CPU between the phases: each result moves to the host once, where the
teacher's schedule produces it, and travels between ranks on the compute device (NCCL sends only
device tensors), one message at a time. For a fused-linear loss the teacher sends its
final hidden states ``[L, h]`` instead of its logits ``[L, V/TP]`` (h << V/TP), and each student
last-stage rank receives the teacher's output-layer weight shard once (:meth:`MegatronTeacher.lm_head_for`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.losses import token_logprobs, topk_logprobs
from megatron_opd.parallel import ModelParallel, ParallelLayout
from megatron_opd.models.schedule import final_hidden_states, gather_sequence_parallel, output_weight, run_schedule
from megatron_opd.train.data import block_causal_mask, packed_positions

LOGITS, HIDDEN, TOPK, TOKEN = "logits", "hidden", "topk", "token"


@dataclass
class TeacherSignal:
    """What the loss of one micro-batch gets from the teacher (fields per ``need``)."""

    logits: torch.Tensor | None = None          # [L, V_local] (teacher's vocab shard)
    hidden: torch.Tensor | None = None          # [L, h] final hidden states (fused-linear losses)
    topk_ids: torch.Tensor | None = None        # [L, K]
    topk_logprobs: torch.Tensor | None = None   # [L, K]
    token_logprobs: torch.Tensor | None = None  # [L] of the micro-batch's targets


def _wire(mb: dict) -> dict:
    """The part of a micro-batch the teacher needs, as plain CPU data."""
    return {"input_ids": mb["input_ids"].cpu(), "targets": mb["targets"].cpu(), "lengths": mb["lengths"]}


def _unwire(w: dict, device, sliding_window) -> dict:
    ids = w["input_ids"].to(device)
    mb = {"input_ids": ids, "targets": w["targets"].to(device),
          "position_ids": packed_positions(w["lengths"], device=device)}
    if len(w["lengths"]) > 1 or sliding_window is not None:
        mb["attention_mask"] = block_causal_mask(w["lengths"], sliding_window=sliding_window).to(device)
    return mb


class MegatronTeacher:
    """A frozen megatron teacher on its own process groups. Collective: every rank builds it."""

    def __init__(self, path: str, layout: ParallelLayout, *, need: str, top_k: int = 0,
                 temperature: float = 1.0, seed: int = 1234, params_dtype: torch.dtype = torch.float32):
        from megatron_opd.checkpoint.load import load_model

        self.mp: ModelParallel = parallel.build_model_parallel(layout, what="teacher")
        self.model = load_model(path, self.mp, seed=seed, params_dtype=params_dtype)
        self.model.module.eval()
        for p in self.model.module.parameters():
            p.requires_grad_(False)
        self.need, self.top_k, self.temperature = need, top_k, temperature
        self.arch = self.model.arch

    @torch.no_grad()
    def signals(self, my_micro_batches: list[dict], student: ModelParallel) -> list[TeacherSignal | None]:
        """Teacher signals for this student replica's micro-batches; real on the student's last
        stage (None elsewhere). Collective over the whole world."""
        device = parallel.device()
        world = dist.get_world_size()
        # Every replica's micro-batches, known everywhere (token ids only: small).
        share = (student.dp_rank, [_wire(mb) for mb in my_micro_batches]) \
            if dist.get_rank(student.mp_group) == 0 else None
        everything = [None] * world
        dist.all_gather_object(everything, share)
        work = []  # (student dp rank, local index, wire)
        for item in everything:
            if item is not None:
                d, mbs = item
                work.extend((d, i, w) for i, w in enumerate(mbs))
        work.sort(key=lambda x: (x[0], x[1]))
        tmp = self.mp
        mine = [k for k in range(len(work)) if k % tmp.dp_size == tmp.dp_rank]
        sw = self.arch.sliding_window
        mbs = [_unwire(work[k][2], device, sw) for k in mine]
        vocab = self.arch.vocab_size

        def output_fn(output, mb):
            z = output[0]
            out = {}
            if self.need == LOGITS:
                out["logits"] = z.detach().to("cpu", copy=True)
            if self.need == HIDDEN:
                out["hidden"] = gather_sequence_parallel(output, self.model)[0].to("cpu", copy=True)
            if self.need == TOPK:
                ids, lps = topk_logprobs(z, self.top_k, vocab_size=vocab, tp_group=tmp.tp_group,
                                         temperature=self.temperature)
                out["topk_ids"], out["topk_logprobs"] = ids.cpu(), lps.cpu()
            if self.need == TOKEN:
                out["token_logprobs"] = token_logprobs(z, mb["targets"][0].clamp(0, vocab - 1),
                                                       vocab_size=vocab, tp_group=tmp.tp_group,
                                                       temperature=self.temperature).cpu()
            return out

        hidden = final_hidden_states(self.model) if self.need == HIDDEN else contextlib.nullcontext()
        with hidden:
            results = run_schedule(self.model, mbs, output_fn, forward_only=True) if mbs else []
        produced = dict(zip(mine, results)) if tmp.is_last_stage else {}
        return self._deliver(work, produced, student)

    @torch.no_grad()
    def lm_head_for(self, student: ModelParallel) -> torch.Tensor | None:
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
                    weight = output_weight(self.model).detach()
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
        keys = {LOGITS: ("logits",), HIDDEN: ("hidden",), TOPK: ("topk_ids", "topk_logprobs"),
                TOKEN: ("token_logprobs",)}[self.need]
        for k, (d, i, w) in enumerate(work):
            e = k % tmp.dp_size
            L = w["input_ids"].shape[1]
            for r in range(student.layout.tp):
                dst = student.global_rank(tp_rank=r, pp_rank=s_last, dp_rank=d)
                # Full logits: teacher TP rank r holds the shard student TP rank r needs (hidden
                # states are the same on every teacher TP rank: spread the sends the same way).
                src_tp = r if self.need in (LOGITS, HIDDEN) else 0
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


class ServedTeacherSource:
    """Teacher signals from a served teacher (top-k or sampled-token log-probs over HTTP)."""

    def __init__(self, client, *, need: str, top_k: int):
        self.client, self.need, self.top_k = client, need, top_k

    def signals(self, my_micro_batches: list[dict], student: ModelParallel,
                sequences_of: list[list[list[int]]]) -> list[TeacherSignal | None]:
        """``sequences_of[m]`` are the token lists packed into micro-batch m (in order)."""
        if not student.is_last_stage:
            return [None] * len(my_micro_batches)
        payload = None
        if student.tp_rank == 0:
            flat = [s for seqs in sequences_of for s in seqs]
            scored = self.client.score(flat)
            payload, pos = [], 0
            for mb, seqs in zip(my_micro_batches, sequences_of):
                L = mb["input_ids"].shape[1]
                sig = TeacherSignal(token_logprobs=torch.zeros(L), topk_ids=torch.zeros(L, self.top_k, dtype=torch.long),
                                    topk_logprobs=torch.full((L, self.top_k), -1e4))
                off = 0
                for s in seqs:
                    sc = scored[pos]
                    pos += 1
                    n = len(s) - 1
                    sig.token_logprobs[off:off + n] = torch.tensor(sc.logprobs[:n])
                    if self.need == TOPK:
                        sig.topk_ids[off:off + n] = torch.tensor(sc.topk_ids[:n])
                        sig.topk_logprobs[off:off + n] = torch.tensor(sc.topk_logprobs[:n])
                    off += len(s)
                payload.append(sig)
        box = [payload]
        if student.layout.tp > 1:
            src = student.global_rank(tp_rank=0, pp_rank=student.pp_rank)
            dist.broadcast_object_list(box, src=src, group=student.tp_group)
        return box[0]
