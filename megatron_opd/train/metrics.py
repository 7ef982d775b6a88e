"""A step's metrics, reduced over the world by name, and run logging on rank 0: console lines,
`metrics.jsonl` (one object per step), TensorBoard and optional wandb (offline works), plus a
progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.parallel import ModelParallel
from megatron_opd.utils import atomic_write_text, log0

# What the objective's metrics of each micro-batch are summed as (see train/objective.py).
LOSS_SUMS = ("loss_sum", "divergence_sum", "loss_tokens", "mismatch_sum", "mismatch_tokens", "topk_overlap_sum",
             "topk_mass_overlap_sum", "xtok_span_tokens", "xtok_tokens")
SEQUENCE_SUMS = ("completion_tokens", "tool_tokens", "sequences", "tokens", "reward_sum", "rewarded")


def all_reduce_named(sums: dict[str, float], maxima: dict[str, float], *, names: tuple[str, ...],
                     max_names: tuple[str, ...]) -> dict[str, float]:
    """Sum ``sums`` and take the maximum of ``maxima`` over the world, by name: every rank passes
    the same ``names`` / ``max_names`` (a name it has no value for counts as 0). One all-reduce each."""
    device = parallel.device()
    summed = torch.tensor([float(sums.get(k, 0.0)) for k in names], dtype=torch.float64, device=device)
    peak = torch.tensor([float(maxima.get(k, 0.0)) for k in max_names], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(zip(names + max_names, summed.tolist() + peak.tolist()))


def step_metrics(outputs: list[dict], seqs: list, mp: ModelParallel) -> dict:
    """Loss, divergence and the rollout metrics of a step over every replica, from the objective's
    per-micro-batch sums (last stage, TP rank 0) and the replica's sequences (one rank each)."""
    sums: dict[str, float] = {}
    mismatch_max = 0.0
    if mp.is_last_stage and mp.tp_rank == 0:
        for o in outputs:
            for k in LOSS_SUMS:
                if k in o:
                    sums[k] = sums.get(k, 0.0) + float(o[k])
            if "mismatch_max" in o:  # NaN (an engine with undefined weights) counts as infinite
                worst = float(o["mismatch_max"])
                mismatch_max = max(mismatch_max, math.inf if math.isnan(worst) else worst)
    if mp.tp_rank == 0 and mp.pp_rank == 0:  # one rank per replica counts the sequences
        completion = sum(s.completion_len for s in seqs)
        sums.update(completion_tokens=completion, sequences=len(seqs), tokens=sum(len(s.tokens) for s in seqs),
                    tool_tokens=sum(s.completion_len - sum(s.completion_mask) for s in seqs),
                    reward_sum=sum(s.reward for s in seqs if s.reward is not None),
                    rewarded=sum(s.reward is not None for s in seqs))
    s = all_reduce_named(sums, {"mismatch_max": mismatch_max}, names=LOSS_SUMS + SEQUENCE_SUMS,
                         max_names=("mismatch_max",))
    tokens = max(s["loss_tokens"], 1.0)
    out = {"loss": s["loss_sum"] / tokens, "divergence": s["divergence_sum"] / tokens,
           "response_length": s["completion_tokens"] / max(s["sequences"], 1),
           "masked_tool_fraction": s["tool_tokens"] / max(s["completion_tokens"], 1),
           "loss_tokens": s["loss_tokens"], "sequences": s["sequences"], "_tokens": s["tokens"]}
    if s["topk_overlap_sum"]:
        out["topk_overlap"] = s["topk_overlap_sum"] / tokens
        out["topk_mass_overlap"] = s["topk_mass_overlap_sum"] / tokens
    if s["rewarded"]:
        out["rollout/reward_mean"] = s["reward_sum"] / s["rewarded"]
    if s["xtok_tokens"]:  # a teacher with its own tokenizer: trained tokens in aligned spans
        out["xtok/span_coverage"] = s["xtok_span_tokens"] / s["xtok_tokens"]
    if s["mismatch_tokens"]:
        out["rollout/logprob_abs_diff_max"] = s["mismatch_max"]
        out["rollout/logprob_abs_diff_mean"] = s["mismatch_sum"] / s["mismatch_tokens"]
    return out


def _drop_rows_after(jsonl: Path, step: int) -> None:
    """A resumed run continues the file from its checkpoint: rows of steps after it (logged by
    a run that died before its next checkpoint) are dropped, so every step appears once. A torn
    last line (the run was killed while writing it) is dropped with a warning."""
    if not jsonl.is_file():
        return
    lines = jsonl.read_text().splitlines(keepends=True)
    kept = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                log0(f"warning: {jsonl}:{lineno}: dropped a torn last line (the run stopped while "
                     f"writing it): {line.strip()[:80]!r}")
                continue
            raise ValueError(f"{jsonl}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{jsonl}:{lineno}: expected a JSON object per line, got {line.strip()[:80]!r}")
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        atomic_write_text(jsonl, "".join(kept))


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "megatron_opd",
                 progress_bar: bool = True, config: dict | None = None):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = self._bar = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.run_dir / "metrics.jsonl"
        _drop_rows_after(jsonl, start_step)
        self._jsonl = jsonl.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("[megatron-opd] tensorboard is not installed; logging.tensorboard ignored",
                      file=sys.stderr)
        if wandb:
            import wandb as wb  # optional extra; WANDB_MODE=offline works without network

            self._wandb = wb.init(project=wandb_project, dir=str(self.run_dir), config=config or {})
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="opd", unit="step",
                             file=sys.stderr, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if console:
            keys = [k for k in ("loss", "divergence", "eval/accuracy", "lr", "tokens_per_s",
                                "rollout/logprob_abs_diff_max") if k in numeric]
            line = " ".join(f"{k}={numeric[k]:.4g}" for k in keys)
            msg = f"[megatron-opd] step {step} {line}"
            if self._bar is not None:
                self._bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
