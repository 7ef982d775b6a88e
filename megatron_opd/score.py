"""Score token sequences with a sharded model: per-token log-probs and top-k, vocab-parallel.

This is how users precompute teacher signals offline, and how we prove a model is right.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.losses import token_logprobs, topk_logprobs
from megatron_opd.models.builder import ShardedModel
from megatron_opd.pipeline import run_schedule
from megatron_opd.utils import atomic_write_text, log0, progress


def read_token_jsonl(path: str | Path, *, vocab_size: int) -> list[list[int]]:
    """Sequences from a JSONL file of ``{"input_ids": [...]}``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: input file does not exist")
    sequences = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            ids = row.get("input_ids") if isinstance(row, dict) else None
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}:{lineno}: expected {{\"input_ids\": [int, ...]}} with at "
                                 "least one token")
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{path}:{lineno}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {vocab_size})")
            sequences.append(ids)
    return sequences


def make_micro_batches(sequences: list[list[int]], indices: list[int], *, max_tokens: int,
                       device: torch.device) -> list[dict]:
    """Group sequences (sorted by length) into right-padded micro-batches of <= max_tokens tokens."""
    order = sorted(indices, key=lambda i: len(sequences[i]))
    batches, current = [], []

    def flush():
        if not current:
            return
        length = max(len(sequences[i]) for i in current)
        ids = torch.zeros(len(current), length, dtype=torch.long)
        for row, i in enumerate(current):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        batches.append({"input_ids": ids.to(device),
                        "position_ids": torch.arange(length, device=device).expand(len(current), -1),
                        "indices": list(current)})
        current.clear()

    for i in order:
        if current and (len(current) + 1) * len(sequences[i]) > max_tokens:
            flush()
        current.append(i)
    flush()
    return batches


def filler_micro_batches(batches: list[dict], mp, *, device: torch.device) -> list[dict]:
    """Micro-batches that score nothing, so that every data-parallel replica runs as many as the
    busiest: expert-parallel ranks sit in different replicas and exchange tokens in every MoE
    layer's forward, so they must run the same number of forwards."""
    count = torch.tensor(len(batches), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    filler = {"input_ids": ids, "position_ids": torch.arange(2, device=device).expand(1, -1), "indices": []}
    return [filler] * (int(count) - len(batches))


@torch.no_grad()
def score_sequences(model: ShardedModel, sequences: list[list[int]], *, top_k: int = 0,
                    temperature: float = 1.0, max_tokens: int = 4096,
                    show_progress: bool = True) -> list[dict] | None:
    """Score ``sequences``; returns the output rows (in input order) on global rank 0, else None.

    Sequences are split round-robin over data-parallel replicas; each replica pipelines its
    micro-batches; the last stage's TP rank 0 of every replica sends its rows to rank 0.
    """
    mp = model.mp
    model.module.eval()
    mine = [i for i in range(len(sequences)) if i % mp.dp_size == mp.dp_rank]
    batches = make_micro_batches(sequences, mine, max_tokens=max_tokens, device=parallel.device())
    if mp.layout.ep > 1:
        batches += filler_micro_batches(batches, mp, device=parallel.device())
    vocab = model.arch.vocab_size
    rows: dict[int, dict] = {}

    def output_fn(logits, batch):
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
            for row, i in enumerate(batch["indices"]):
                n = len(sequences[i]) - 1
                r = {"logprobs": out["logprobs"][row, :n].tolist()}
                if top_k:
                    r["topk_ids"] = out["topk_ids"][row, :n].tolist()
                    r["topk_logprobs"] = out["topk_logprobs"][row, :n].tolist()
                rows[i] = r
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


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def main(args) -> int:
    """``megatron-opd score``: see ``cli.py`` for the arguments."""
    from megatron_opd.checkpoint.load import load_model, model_arch

    parallel.init_distributed()
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: output exists (pass --force to overwrite)")
    if not Path(args.input).is_file():  # before any model is built
        raise ValueError(f"{args.input}: input file does not exist")
    layout = parallel.ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep)
    model_arch(args.model).check_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    mp = parallel.initialize_global_model_parallel(layout, what="score")
    model = load_model(args.model, mp)
    sequences = read_token_jsonl(args.input, vocab_size=model.arch.vocab_size)
    rows = score_sequences(model, sequences, top_k=args.top_k, max_tokens=args.max_tokens)
    if rows is not None:
        write_jsonl(out, rows)
        log0(f"wrote {len(rows)} rows to {out}")
    dist.barrier()
    return 0
