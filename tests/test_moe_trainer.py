"""An OPD run with a mixture-of-experts student at expert parallel 2: the two data-parallel
replicas hold two experts each and forward in lockstep (the busier one's micro-batch count, the
other padded with fillers that train on nothing); after every weight sync the student's vLLM
engine (TP 1 per rank, every expert) samples with exactly the trainer's weights."""

from pathlib import Path

import pytest

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_task import base_overrides, losses

pytestmark = pytest.mark.vllm

STEPS = 3


def _moe_student(root: Path) -> Path:
    """A Qwen3-MoE student (4 experts, top-2) in the task's shapes, with the task's tokenizer."""
    from megatron_opd.tasks import arithmetic as task
    from megatron_opd.testing.tiny import make_hf_model

    shapes = task.llama_config(hidden=64, heads=2, layers=2)
    shapes.pop("model_type")
    out = make_hf_model(root / "moe_student", "qwen3_moe", seed=3, **shapes, num_experts=4,
                        moe_intermediate_size=48)
    task.make_tokenizer(out)
    return out


def _lockstep_packing() -> dict:
    """Replicas with 3 and 1 sequences of 30 tokens under a 64-token budget: both get 2 micro-batches,
    the filler with no loss token."""
    import torch.distributed as dist

    from megatron_opd.train.data import Sequence, pack_micro_batches

    n = 3 if dist.get_rank() == 0 else 1
    seqs = [Sequence(i, 0, list(range(1, 31)), 10, [1] * 20) for i in range(n)]
    batches = pack_micro_batches(seqs, budget=64, device="cpu", lockstep=True)
    return {"count": len(batches), "indices": [b["index"] for b in batches],
            "loss_tokens": [float(b["loss_mask"].sum()) for b in batches]}


def _run(root: str, moe_dir: str, run_dir: str) -> dict:
    from megatron_opd.config import load_config
    from megatron_opd.train.loop import Trainer

    packing = _lockstep_packing()
    overrides = base_overrides(Path(root), Path(run_dir), STEPS) + [
        f"student.path={moe_dir}", "student.tp=1", "student.ep=2", "teacher.tp=1"]
    trainer = Trainer(load_config(None, overrides))
    assert trainer.mp.layout.ep == 2 and trainer.student.num_local_experts == 2
    last = trainer.train()
    trainer.close()
    return {"packing": packing, "last": {k: v for k, v in last.items() if isinstance(v, float)}}


def test_moe_student_at_ep2_matches_the_engine_after_every_sync(task_dir, tmp_path):
    import math

    moe_dir = _moe_student(tmp_path)
    run_dir = tmp_path / "run"
    results = run_distributed(_run, 2, str(task_dir), str(moe_dir), str(run_dir), timeout=900,
                              env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    assert [r["packing"]["count"] for r in results] == [2, 2]
    assert results[1]["packing"]["indices"] == [0, 1] and results[1]["packing"]["loss_tokens"] == [20.0, 0.0]
    per_step = losses(run_dir)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    for step, (loss, grad_norm, mismatch) in per_step.items():
        assert math.isfinite(loss) and grad_norm > 0, (step, loss, grad_norm)
        # the engine sampled with the weights synced after the previous step's update
        assert mismatch is not None and mismatch <= 1e-4, (step, mismatch)
    last = results[0]["last"]
    assert last["moe/tokens_per_expert_min"] >= 0 and last["moe/tokens_per_expert_max"] > 0, last
    assert last["moe/load_imbalance"] >= 1.0, last
