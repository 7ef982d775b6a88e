"""Reference checks shared by tests: megatron logits against transformers' own forward."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.checkpoint.load import load_model
from megatron_opd.models.schedule import run_schedule


def gathered_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from TP shards (tests only: production code never does this)."""
    parts = [torch.empty_like(logits) for _ in range(model.mp.layout.tp)]
    dist.all_gather(parts, logits.contiguous(), group=model.mp.tp_group)
    return torch.cat(parts, dim=-1)[..., : model.arch.vocab_size]


def logits_vs_transformers(models: dict, layouts: list, *, seq_len: int = 13) -> dict:
    """Run in every rank: max |logit diff| per (name, tp, pp[, ep]) on this rank's last stage;
    ``layouts`` are ``(tp, pp)`` or ``(tp, pp, ep)`` tuples.

    ``models`` maps a name to an HF directory, or to ``(hf_dir, checkpoint_dir)`` to load the
    megatron model from another checkpoint (e.g. a converted one) and compare with ``hf_dir``.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, seq_len))
    batch = {"input_ids": ids, "position_ids": torch.arange(seq_len).expand(2, -1)}
    refs, sources = {}, {}
    for name, spec in models.items():
        ref_dir, load_dir = spec if isinstance(spec, (tuple, list)) else (spec, spec)
        sources[name] = load_dir
        hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            refs[name] = hf(ids).logits
    diffs = {}
    for layout in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(*layout))
        for name, load_dir in sources.items():
            model = load_model(load_dir, mp)
            model.module.eval()
            out = run_schedule(model, [batch], lambda lg, b: gathered_logits(model, lg), forward_only=True)
            if out:
                diffs[(name, *layout)] = (out[0] - refs[name]).abs().max().item()
    return diffs
