"""A step's training sequences for one data-parallel replica: its share of the step's prompts,
on-policy rollouts from the student's engines (spread over the replica's ranks, multi-turn with an
environment), off-policy completions from the dataset or from the teacher's engine."""

from __future__ import annotations

from dataclasses import replace

import torch.distributed as dist

from megatron_opd.parallel import ModelParallel
from megatron_opd.rollout.engine import RolloutEngine, SamplingConfig
from megatron_opd.train.alignment import TokenizerPair
from megatron_opd.train.data import PromptRecord, Sequence, StepPrompts


def _sample_turns(engine: RolloutEngine, records: list[PromptRecord], sampling: SamplingConfig, *,
                  environment, max_turns: int, max_total_tokens: int) -> list[Sequence]:
    """Sample (multi-turn when an environment is set) on this rank's engine."""
    if not records:
        return []
    first = engine.generate([r.prompt_ids for r in records], sampling,
                            prompt_indices=[r.index for r in records])
    by_index = {r.index: r for r in records}
    seqs = []
    for c in first:
        seqs.append(Sequence(c.prompt_index, c.sample_index, c.prompt_ids + c.token_ids, len(c.prompt_ids),
                             [1] * len(c.token_ids), list(c.logprobs), True, 1.0, c.finish_reason))
    if environment is None:
        return seqs
    active = list(range(len(seqs)))
    for turn in range(max_turns - 1):
        continuing, contexts = [], []
        for i in active:
            s = seqs[i]
            if s.finish_reason != "stop":
                continue
            reply = environment.respond(by_index[s.prompt_index], s.tokens, turn)
            if not reply or len(s.tokens) + len(reply) >= max_total_tokens:
                continue
            s.tokens = s.tokens + list(reply)
            s.completion_mask = s.completion_mask + [0] * len(reply)
            s.rollout_logprobs = s.rollout_logprobs + [0.0] * len(reply)
            continuing.append(i)
            contexts.append(s.tokens)
        if not continuing:
            break
        turn_sampling = replace(sampling, n=1, seed=sampling.seed + 7919 * (turn + 1),
                                max_new_tokens=min(sampling.max_new_tokens,
                                                   max_total_tokens - max(len(c) for c in contexts)))
        outs = engine.generate(contexts, turn_sampling,
                               prompt_indices=[seqs[i].prompt_index * 64 + seqs[i].sample_index for i in continuing])
        for i, c in zip(continuing, outs):
            s = seqs[i]
            s.tokens = s.tokens + c.token_ids
            s.completion_mask = s.completion_mask + [1] * len(c.token_ids)
            s.rollout_logprobs = s.rollout_logprobs + list(c.logprobs)
            s.finish_reason = c.finish_reason
        active = continuing
    return seqs


def distributed_rollouts(engine: RolloutEngine, records: list[PromptRecord], sampling: SamplingConfig,
                         mp: ModelParallel, *, environment=None, max_turns: int = 1,
                         max_total_tokens: int) -> list[Sequence]:
    """Sample for ``records`` using every engine of the replica (each rank of the model's
    tensor x pipeline group holds one), then share the results within the replica."""
    group = mp.mp_group
    size = dist.get_world_size(group)
    me = dist.get_rank(group)
    mine = _sample_turns(engine, records[me::size], sampling, environment=environment,
                         max_turns=max_turns, max_total_tokens=max_total_tokens)
    gathered = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    out = [s for part in gathered for s in part]
    return sorted(out, key=lambda s: (s.prompt_index, s.sample_index))


def offpolicy_from_dataset(records: list[PromptRecord], *, weight_field: str = "") -> list[Sequence]:
    out = []
    for r in records:
        if r.completion_ids is None:
            raise ValueError(f"prompt {r.index} has no completion: off-policy batches "
                             "(rollout.lmbda < 1 with offpolicy_source=dataset) need a 'completion' field")
        out.append(Sequence(r.index, 0, r.prompt_ids + r.completion_ids, len(r.prompt_ids),
                            [1] * len(r.completion_ids), None, False, _weight(r, weight_field), "dataset"))
    return out


def align_to_teacher(pair: TokenizerPair, seqs: list[Sequence], records: list[PromptRecord], *,
                     step: int) -> None:
    """Give every sequence the teacher's tokenization of its text and the spans both tokenizations
    share (``Sequence.alignment``); the teacher renders the prompt from the row's messages with its
    own chat template, or encodes the row's text. Raises ``AlignmentError`` naming the step, prompt
    and sample for a chat template that cannot render, or an alignment that covers less than the
    pair's ``min_coverage`` of a completion."""
    if not seqs:
        return
    by_index = {r.index: r for r in records}
    rows = [by_index[s.prompt_index] for s in seqs]
    alignments = pair.align_batch(
        [s.tokens[:s.prompt_len] for s in seqs], [s.tokens[s.prompt_len:] for s in seqs],
        messages=[r.messages for r in rows], prompt_texts=[None if r.messages else r.prompt_text for r in rows],
        where=[f"step {step}, prompt {s.prompt_index}, sample {s.sample_index}"
               for s in seqs])
    for s, a in zip(seqs, alignments):
        s.alignment = a


def _weight(record: PromptRecord, weight_field: str) -> float:
    if not weight_field:
        return 1.0
    if weight_field not in record.metadata:
        raise ValueError(f"prompt {record.index} has no field {weight_field!r} (loss.weight_field)")
    return float(record.metadata[weight_field])


class Rollouts:
    """This replica's training sequences of each step (identical on every rank of the replica).

    ``rollout``: the ``rollout`` config section (sampling, off-policy source, turns);
    ``teacher_engine``: the teacher's engine when off-policy samples come from the teacher;
    ``aligner``: the tokenizer pair of a teacher with its own tokenizer (every sequence is then
    aligned to the teacher's tokenization).
    """

    def __init__(self, rollout, prompts: StepPrompts, *, mp: ModelParallel, student_engine: RolloutEngine,
                 teacher_engine: RolloutEngine | None, environment, stop_token_ids: list[int],
                 max_total_tokens: int, weight_field: str = "", aligner: TokenizerPair | None = None):
        self.rollout, self.prompts, self.mp = rollout, prompts, mp
        self.student_engine, self.teacher_engine = student_engine, teacher_engine
        self.environment, self.stop_token_ids, self.max_total_tokens = environment, stop_token_ids, max_total_tokens
        self.weight_field, self.aligner = weight_field, aligner

    def for_step(self, step: int) -> list[Sequence]:
        records, on_policy = self.prompts.for_replica(step, dp_rank=self.mp.dp_rank, dp_size=self.mp.dp_size)
        sampling = self.rollout.sampling(seed=self.prompts.seed, step=step, stop_token_ids=self.stop_token_ids)
        onp = [r for r, flag in zip(records, on_policy) if flag]
        off = [r for r, flag in zip(records, on_policy) if not flag]
        seqs = self._sample(self.student_engine, onp, sampling) if onp else []
        for s in seqs:
            s.weight = _weight(next(r for r in onp if r.index == s.prompt_index), self.weight_field)
        if off and self.rollout.offpolicy_source == "dataset":
            seqs += offpolicy_from_dataset(off, weight_field=self.weight_field)
        elif off:
            teacher_seqs = self._sample(self.teacher_engine, off, sampling)
            for s in teacher_seqs:
                s.on_policy = False
                s.rollout_logprobs = None  # the teacher's, not the student's: no mismatch metric
            seqs += teacher_seqs
        if self.aligner is not None:
            align_to_teacher(self.aligner, seqs, records, step=step)
        return seqs

    def _sample(self, engine: RolloutEngine, records: list[PromptRecord], sampling: SamplingConfig) -> list[Sequence]:
        return distributed_rollouts(engine, records, sampling, self.mp, environment=self.environment,
                                    max_turns=self.rollout.max_turns, max_total_tokens=self.max_total_tokens)
