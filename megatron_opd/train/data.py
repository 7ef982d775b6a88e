"""Prompt datasets, the deterministic step sampler, tokenizer compatibility, and sequence packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_opd.models.packing import pack_lengths, packed_inputs, row_padding
from megatron_opd.parallel import lockstep_count
from megatron_opd.train.alignment import Alignment, pack_alignments
from megatron_opd.utils import read_jsonl


@dataclass
class PromptRecord:
    """One dataset row, tokenized. ``metadata`` keeps every other field (answers, rewards...)."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int] | None = None
    metadata: dict = field(default_factory=dict)
    # The prompt as the row gave it (a teacher with its own tokenizer renders or encodes it itself).
    messages: list[dict] | None = None
    prompt_text: str | None = None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".parquet" and path.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        # columns are shared by every row: a field a row does not have is null there
        return [(i + 1, {k: v for k, v in row.items() if v is not None})
                for i, row in enumerate(pq.read_table(path).to_pylist())]
    return read_jsonl(path, what="data file")


def _ids(value, where: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise ValueError(f"{where}: expected a list of token ids")
    bad = [i for i in value if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return value


def load_prompts(path: str | Path, tokenizer, *, vocab_size: int, max_prompt_tokens: int) -> list[PromptRecord]:
    """Rows with ``messages`` (chat; rendered with the tokenizer's chat template), ``prompt``
    (text) or ``prompt_ids``; optional ``completion`` / ``completion_ids`` for off-policy batches;
    any other field is metadata. Errors name the file and line."""
    path = Path(path)
    records = []
    for lineno, row in _read_rows(path):
        where = f"{path}:{lineno}"
        meta = {k: v for k, v in row.items()
                if k not in ("messages", "prompt", "prompt_ids", "completion", "completion_ids")}
        if "prompt_ids" in row:
            prompt = _ids(row["prompt_ids"], f"{where}: prompt_ids", vocab_size)
        elif "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise ValueError(f"{where}: messages must be a list of {{role, content}} objects")
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"{where}: chat messages need a tokenizer with a chat template")
            prompt = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        elif "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise ValueError(f"{where}: prompt must be a string")
            if tokenizer is None:
                raise ValueError(f"{where}: text prompts need a tokenizer next to the student model")
            prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        else:
            raise ValueError(f"{where}: a row needs 'messages', 'prompt' or 'prompt_ids'")
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty after tokenization")
        if len(prompt) > max_prompt_tokens:
            raise ValueError(f"{where}: prompt has {len(prompt)} tokens, more than "
                             f"data.max_prompt_tokens={max_prompt_tokens}")
        completion = None
        if "completion_ids" in row:
            completion = _ids(row["completion_ids"], f"{where}: completion_ids", vocab_size)
        elif "completion" in row:
            if not isinstance(row["completion"], str):
                raise ValueError(f"{where}: completion must be a string")
            if tokenizer is None:
                raise ValueError(f"{where}: text completions need a tokenizer next to the student model "
                                 "(or give completion_ids)")
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
        records.append(PromptRecord(len(records), list(prompt), completion, meta,
                                    messages=row.get("messages") if "prompt_ids" not in row else None,
                                    prompt_text=row.get("prompt") if "prompt_ids" not in row else None))
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def load_tokenizer(path: str | Path):
    """The HF tokenizer stored with a model (None if there is none: token-id data only)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(p))


def eos_token_ids(hf_config: dict, tokenizer) -> list[int]:
    """The ids that end a completion: the model config's ``eos_token_id``, else the tokenizer's."""
    eos = hf_config.get("eos_token_id")
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def check_tokenizers(student, teacher, *, student_vocab: int, teacher_vocab: int) -> None:
    """Refuse a teacher whose token ids disagree with the student's over the shared vocabulary.

    Sizes may differ by padding (rows no token maps to); a token that both know under different
    ids, or an id both use for different tokens, is a real mismatch."""
    if student is None or teacher is None:
        return
    s, t = student.get_vocab(), teacher.get_vocab()
    shared = min(student_vocab, teacher_vocab)
    s_by_id = {i: tok for tok, i in s.items() if i < shared}
    t_by_id = {i: tok for tok, i in t.items() if i < shared}
    for i in sorted(set(s_by_id) | set(t_by_id)):
        if s_by_id.get(i) != t_by_id.get(i):
            raise ValueError(f"teacher and student tokenizers disagree at token id {i}: student "
                             f"{s_by_id.get(i)!r}, teacher {t_by_id.get(i)!r}; distillation needs "
                             "identical token ids")


def step_prompt_indices(num_records: int, *, step: int, prompts_per_step: int, seed: int,
                        shuffle: bool) -> list[int]:
    """The dataset indices of ``step``'s prompts: a deterministic stream of epoch permutations,
    so the data position is just the step number (resume picks up exactly)."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    start = step * prompts_per_step
    for pos in range(start, start + prompts_per_step):
        epoch, offset = divmod(pos, num_records)
        if shuffle:
            if epoch not in perms:
                perms[epoch] = torch.randperm(num_records,
                                              generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            out.append(int(perms[epoch][offset]))
        else:
            out.append(offset)
    return out


@dataclass(frozen=True)
class StepPrompts:
    """Which prompts each step trains on, and which of them are sampled on-policy: a fraction
    ``lmbda`` of the step's prompts, drawn from the step's own seed (resuming needs only the step)."""

    records: list[PromptRecord]
    per_step: int
    seed: int
    shuffle: bool = True
    lmbda: float = 1.0

    def for_replica(self, step: int, *, dp_rank: int, dp_size: int) -> tuple[list[PromptRecord], list[bool]]:
        """Data-parallel replica ``dp_rank``'s share of ``step``'s prompts, and their on-policy flags."""
        indices = step_prompt_indices(len(self.records), step=step, prompts_per_step=self.per_step,
                                      seed=self.seed, shuffle=self.shuffle)
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        flags = (torch.rand(len(indices), generator=g) < self.lmbda).tolist()
        mine = range(dp_rank, len(indices), dp_size)
        return [self.records[indices[i]] for i in mine], [flags[i] for i in mine]


# --- packing ------------------------------------------------------------------------------------

@dataclass
class Sequence:
    """A prompt plus completion. Per completion token: whether it is trained on (tool/environment
    tokens are not) and the rollout engine's log-prob of it (on-policy samples)."""

    prompt_index: int
    sample_index: int
    tokens: list[int]
    prompt_len: int
    completion_mask: list[int]
    rollout_logprobs: list[float] | None = None
    on_policy: bool = True
    weight: float = 1.0
    finish_reason: str = ""
    # A teacher with its own tokenizer: the teacher's tokenization of the same text and the spans
    # (train/alignment.py); None when both share token ids.
    alignment: Alignment | None = None
    reward: float | None = None  # the verifier's score (loss.verifier), None when not scored

    @property
    def completion_len(self) -> int:
        return len(self.tokens) - self.prompt_len


def pack_sequences(seqs: list[Sequence], *, budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``budget`` tokens (see
    :func:`pack_lengths`)."""
    return pack_lengths([len(s.tokens) for s in seqs], budget=budget)


def micro_batch(seqs: list[Sequence], indices: list[int], *, device, multiple_of: int = 1) -> dict:
    """One packed THD row ``[1, L]``: tokens, next-token targets, loss mask (completion tokens only,
    never across sequence boundaries), rollout log-probs, per-token weights, ``position_ids`` and
    megatron's ``packed_seq_params``. ``L`` is brought to a multiple of ``multiple_of`` (see
    :func:`~megatron_opd.models.packing.token_multiple`) by ``padding`` tokens at the end: a
    sequence of their own, with zero loss mask and weight."""
    tokens, targets, mask, rollout, weights, onpol, lengths = [], [], [], [], [], [], []
    for i in indices:
        s = seqs[i]
        n = len(s.tokens)
        lengths.append(n)
        tokens.extend(s.tokens)
        targets.extend(s.tokens[1:] + [0])
        m = [0] * (s.prompt_len - 1) + list(s.completion_mask) + [0]
        assert len(m) == n, (len(m), n)
        mask.extend(m)
        lp = s.rollout_logprobs or [0.0] * s.completion_len
        rollout.extend([0.0] * (s.prompt_len - 1) + list(lp) + [0.0])
        weights.extend([s.weight] * n)
        onpol.extend([float(s.on_policy and s.rollout_logprobs is not None)] * n)
    padding = row_padding(len(tokens), multiple_of)
    for column in (tokens, targets, mask, rollout, weights, onpol):
        column.extend([0] * padding)
    batch = {
        "input_ids": torch.tensor([tokens], device=device),
        "targets": torch.tensor([targets], device=device),
        "loss_mask": torch.tensor([mask], dtype=torch.float32, device=device),
        "rollout_logprobs": torch.tensor([rollout], dtype=torch.float32, device=device),
        "weights": torch.tensor([weights], dtype=torch.float32, device=device),
        "on_policy": torch.tensor([onpol], dtype=torch.float32, device=device),
        "lengths": lengths,
        "padding": padding,
        "seq_indices": list(indices),
    }
    batch.update(packed_inputs(lengths, device=device, padding=padding))
    aligned = [seqs[i].alignment for i in indices]
    if any(a is not None for a in aligned):
        if not all(a is not None for a in aligned):
            raise ValueError("a micro-batch mixes sequences with and without a teacher alignment")
        batch.update(teacher_tokens_of(aligned, device=device),
                     alignment=pack_alignments(aligned, [seqs[i].prompt_len for i in indices], lengths,
                                               padding=padding, device=device))
    return batch


def teacher_tokens_of(alignments: list[Alignment], *, device) -> dict:
    """The same sequences in the teacher's tokenization, packed in the same order: its row's
    ``input_ids``, ``targets`` and ``lengths`` (``batch["teacher_tokens"]``, what the teacher scores;
    the teacher pads it to its own token multiple)."""
    tokens, targets = [], []
    for a in alignments:
        tokens.extend(a.teacher_ids)
        targets.extend(a.teacher_ids[1:] + [0])
    return {"teacher_tokens": {"input_ids": torch.tensor([tokens], device=device),
                               "targets": torch.tensor([targets], device=device),
                               "lengths": [len(a.teacher_ids) for a in alignments], "padding": 0}}


def pack_micro_batches(seqs: list[Sequence], *, budget: int, device, multiple_of: int = 1,
                       lockstep: bool = False) -> list[dict]:
    """``seqs`` packed into micro-batches of at most ``budget`` tokens (see :func:`pack_sequences`;
    plus under ``multiple_of`` tokens of padding), each carrying its ``index`` in the step
    (teacher signals are looked up by it).

    ``lockstep`` (collective over the world): every data-parallel replica gets as many
    micro-batches as the busiest, the others padded with fillers that train on nothing (a
    two-token sequence, no loss token). Expert-parallel peers sit in different replicas and
    exchange tokens in every MoE layer's forward and backward, so they must run the same number."""
    batches = [dict(micro_batch(seqs, idx, device=device, multiple_of=multiple_of), index=m)
               for m, idx in enumerate(pack_sequences(seqs, budget=budget))]
    if lockstep:
        filler = [Sequence(prompt_index=-1, sample_index=0, tokens=[0, 0], prompt_len=2, completion_mask=[],
                           on_policy=False, weight=0.0, finish_reason="filler")]
        for m in range(len(batches), lockstep_count(len(batches))):
            batches.append(dict(micro_batch(filler, [0], device=device, multiple_of=multiple_of),
                                index=m, seq_indices=[]))
    return batches
