"""Score token sequences with a sharded model: per-token log-probs and top-k, vocab-parallel.

This is how users precompute teacher signals offline, and how we prove a model is right.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.checkpoint.load import load_model, model_arch
from megatron_opd.losses import token_logprobs, topk_logprobs
from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.packing import pack_lengths, packed_inputs, row_padding, token_multiple
from megatron_opd.models.schedule import run_schedule
from megatron_opd.utils import check_writable, log0, progress, read_jsonl, write_jsonl


def read_token_jsonl(path: str | Path, *, vocab_size: int) -> list[list[int]]:
    """Sequences from a JSONL file of ``{"input_ids": [...]}``; errors name the file and line."""
    sequences = []
    for lineno, row in read_jsonl(path, what="input file"):
        ids = row.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{path}:{lineno}: expected {{\"input_ids\": [int, ...]}} with at "
                             "least one token")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{path}:{lineno}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {vocab_size})")
        sequences.append(ids)
    return sequences


def make_micro_batches(sequences: list[list[int]], indices: list[int], *, micro_batch_tokens: int,
                       device: torch.device, multiple_of: int = 1) -> list[dict]:
    """Pack the sequences ``indices`` into THD micro-batches of at most ``micro_batch_tokens``
    tokens (first-fit decreasing; a longer sequence gets one of its own): one row ``[1, t]``
    whose sequences attend only to themselves, with positions from 0 in each, padded at its end
    (a padding sequence of its own) to a multiple of ``multiple_of`` tokens."""
    batches = []
    for members in pack_lengths([len(sequences[i]) for i in indices], budget=micro_batch_tokens):
        members = [indices[j] for j in members]
        lengths = [len(sequences[i]) for i in members]
        padding = row_padding(sum(lengths), multiple_of)
        ids = torch.tensor([t for i in members for t in sequences[i]] + [0] * padding, device=device)
        batches.append({"input_ids": ids.view(1, -1), **packed_inputs(lengths, device=device, padding=padding),
                        "indices": members, "lengths": lengths})
    return batches


def filler_micro_batches(batches: list[dict], *, device: torch.device, multiple_of: int = 1) -> list[dict]:
    """Micro-batches that score nothing (a pack of one two-token sequence, padded as the others),
    so that every data-parallel replica runs as many as the busiest: expert-parallel ranks sit in
    different replicas and exchange tokens in every MoE layer's forward, so they must run the
    same number of forwards. Collective over the world."""
    filler = make_micro_batches([[0, 0]], [0], micro_batch_tokens=2, device=device, multiple_of=multiple_of)[0]
    filler.update(indices=[], lengths=[])
    return [filler] * (parallel.lockstep_count(len(batches)) - len(batches))


@torch.no_grad()
def score_sequences(model: ShardedModel, sequences: list[list[int]], *, top_k: int = 0,
                    temperature: float = 1.0, micro_batch_tokens: int = 4096,
                    show_progress: bool = True) -> list[dict] | None:
    """Score ``sequences``; returns the output rows (in input order) on global rank 0, else None.

    Sequences are split round-robin over data-parallel replicas; each replica packs them into
    micro-batches of at most ``micro_batch_tokens`` tokens and pipelines those (at EP > 1 every
    replica runs as many as the busiest: :func:`filler_micro_batches`); the last stage's TP rank 0
    of every replica sends its rows to rank 0.
    """
    mp = model.mp
    model.module.eval()
    mine = [i for i in range(len(sequences)) if i % mp.dp_size == mp.dp_rank]
    multiple = token_multiple(model.config)
    batches = make_micro_batches(sequences, mine, micro_batch_tokens=micro_batch_tokens,
                                 device=parallel.device(), multiple_of=multiple)
    if mp.layout.ep > 1:
        batches += filler_micro_batches(batches, device=parallel.device(), multiple_of=multiple)
    vocab = model.arch.vocab_size
    rows: dict[int, dict] = {}

    def output_fn(logits, batch):
        # [1, t - 1]: position p predicts token p + 1; the positions that cross from one packed
        # sequence into the next are dropped below
        ids = batch["input_ids"]
        lp = token_logprobs(logits[:, :-1], ids[:, 1:], vocab_size=vocab, tp_group=mp.tp_group,
                            temperature=temperature)
        out = {"logprobs": lp.cpu()}
        if top_k:
            tk_ids, tk_lp = topk_logprobs(logits[:, :-1], top_k, vocab_size=vocab, tp_group=mp.tp_group,
                                          temperature=temperature)
            out.update(topk_ids=tk_ids.cpu(), topk_logprobs=tk_lp.cpu())
        return out

    # Micro-batches go through the schedule a few at a time so the progress bar moves.
    group = max(1, mp.layout.pp * 2)
    start = time.perf_counter()
    num_tokens = 0
    bar = progress(total=len(batches), desc="scoring", unit="batch", enabled=show_progress)
    for s in range(0, len(batches), group):
        chunk = batches[s: s + group]
        num_tokens += sum(b["input_ids"].numel() for b in chunk)
        outputs = run_schedule(model, chunk, output_fn, forward_only=True)
        for batch, out in zip(chunk, outputs):
            offset = 0
            for i, length in zip(batch["indices"], batch["lengths"]):
                span = slice(offset, offset + length - 1)
                r = {"logprobs": out["logprobs"][0, span].tolist()}
                if top_k:
                    r["topk_ids"] = out["topk_ids"][0, span].tolist()
                    r["topk_logprobs"] = out["topk_logprobs"][0, span].tolist()
                rows[i] = r
                offset += length
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - start
    log0(f"scored {len(mine)} sequences ({num_tokens} tokens) per replica in {elapsed:.1f}s "
         f"({num_tokens / max(elapsed, 1e-9):.0f} tokens/s)")
    sender = mp.is_last_stage and mp.tp_rank == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows if sender else None, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        if part:
            merged.update(part)
    assert len(merged) == len(sequences), (len(merged), len(sequences))
    return [merged[i] for i in range(len(sequences))]


def check_args(args):
    """Everything about the arguments that can be wrong, checked against the model's config before
    any process group, model or weight exists; returns (architecture, sequences)."""
    check_writable(args.output, directory=False, what="--output")
    if Path(args.output).exists() and not args.force:
        raise ValueError(f"{args.output}: output exists (pass --force to overwrite)")
    if not Path(args.input).is_file():
        raise ValueError(f"{args.input}: input file does not exist")
    for flag, value in (("--micro-batch-tokens", args.micro_batch_tokens), ("--tp", args.tp), ("--pp", args.pp),
                        ("--ep", args.ep)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    arch = model_arch(args.model)
    if not 0 <= args.top_k <= arch.vocab_size:
        raise ValueError(f"--top-k {args.top_k} must be in [0, {arch.vocab_size}] (the vocabulary of "
                         f"{args.model})")
    arch.check_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    sequences = read_token_jsonl(args.input, vocab_size=arch.vocab_size)
    if not sequences:
        raise ValueError(f"{args.input}: no sequences to score (the file is empty)")
    return arch, sequences


def main(args) -> int:
    """``megatron-opd score``: see ``cli.py`` for the arguments."""
    _, sequences = check_args(args)
    parallel.init_distributed()
    layout = parallel.ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    mp = parallel.initialize_global_model_parallel(layout, what="score")
    model = load_model(args.model, mp)
    rows = score_sequences(model, sequences, top_k=args.top_k, micro_batch_tokens=args.micro_batch_tokens)
    out = Path(args.output)
    if rows is not None:
        write_jsonl(out, rows)
        log0(f"wrote {len(rows)} rows to {out}")
    dist.barrier()
    return 0
