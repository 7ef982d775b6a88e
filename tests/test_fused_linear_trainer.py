"""loss.fused_linear in training: the student's last stage hands its final hidden states (not logits)
to the loss, the teacher sends hidden states and its output-layer shard, and the gradients megatron's
DDP accumulates, the metrics and a whole OPD run's loss curve are those of the logits path."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed

# (loss fields, teacher.temperature): each teacher signal (hidden states, top-k, sampled-token
# log-probs), top-k supports, a loss temperature and a teacher temperature != 1.
OBJECTIVES = [
    (dict(kind="reverse_kl"), 1.0),
    (dict(kind="jsd", beta=0.3, support="student_topk", top_k=4, temperature=0.7), 2.0),
    (dict(kind="forward_kl", support="teacher_topk", top_k=4), 1.0),
    (dict(kind="forward_kl", support="teacher_topk_input", top_k=4), 1.0),
    (dict(kind="sampled_reverse_kl", temperature=0.7), 1.0),
]
METRICS = ("loss_sum", "divergence_sum", "mismatch_sum", "topk_overlap_sum")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tied student and an untied teacher of another family and hidden size, one vocabulary
    (300: TP=2 pads it to 512, so rank 1 holds 44 real rows)."""
    from megatron_opd.testing.tiny import make_hf_model

    root = tmp_path_factory.mktemp("fused_models")
    return {"student": str(make_hf_model(root / "student", "qwen2", seed=1, tie_word_embeddings=True)),
            "teacher": str(make_hf_model(root / "teacher", "llama", seed=2))}


def _micro_batches(vocab: int) -> list[dict]:
    """Packed sequences with masked tool tokens, rollout log-probs, on- and off-policy samples and
    per-sample weights."""
    from megatron_opd.train.data import Sequence, pack_micro_batches

    rng = random.Random(0)
    seqs = []
    for i in range(6):
        prompt, completion = rng.randint(3, 6), rng.randint(4, 12)
        mask = [1] * completion
        mask[rng.randrange(completion)] = 0
        tokens = [rng.randrange(vocab) for _ in range(prompt + completion)]
        rollout = [-rng.random() for _ in range(completion)]
        seqs.append(Sequence(prompt_index=i, sample_index=0, tokens=tokens, prompt_len=prompt,
                             completion_mask=mask, rollout_logprobs=rollout, on_policy=i % 3 != 0,
                             weight=(0.5, 1.0, 2.0)[i % 3]))
    return pack_micro_batches(seqs, budget=40, device="cpu")


def _grads_and_metrics(student_dir: str, teacher_dir: str, tp: int, pp: int, teacher_pp: int) -> dict:
    """Per objective and fused in (False, True): every local parameter's main_grad after one
    forward/backward over the micro-batches, and the summed metrics."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.config import LossConfig, OptimConfig
    from megatron_opd.parallel import ParallelLayout
    from megatron_opd.teacher.megatron import MegatronTeacher
    from megatron_opd.teacher.signals import Need
    from megatron_opd.train.optim import forward_backward

    torch.set_num_threads(1)
    mp = parallel.initialize_global_model_parallel(ParallelLayout(tp, pp), what="student")
    student = load_model(student_dir, mp, seed=1)
    trainable = OptimConfig(lr=1e-3).build(student, total_steps=1)
    mbs = _micro_batches(student.arch.vocab_size)
    teachers = {}
    out = {}
    for o, (fields, teacher_temperature) in enumerate(OBJECTIVES):
        for fused in (False, True):
            loss = LossConfig(**fields, fused_linear=fused)
            key = (loss.teacher_need, teacher_temperature)
            if key not in teachers:
                teacher = MegatronTeacher(teacher_dir, ParallelLayout(tp, teacher_pp), need=loss.teacher_need,
                                          top_k=4, temperature=teacher_temperature, seed=1)
                teachers[key] = (teacher, teacher.output_weight(mp) if loss.teacher_need == Need.HIDDEN else None)
            teacher, teacher_weight = teachers[key]
            signals = teacher.signals(mbs, mp)
            objective = loss.build(student, teacher_output_weight=teacher_weight,
                                   teacher_temperature=teacher_temperature, rollout_temperature=1.0)

            def output_fn(output, batch, objective=objective, signals=signals):
                return objective(output, batch, signals[batch["index"]])

            with objective.outputs():
                outputs = forward_backward(trainable, mbs, output_fn)
            grads = {name: p.main_grad.clone() for name, p in student.module.named_parameters()}
            metrics = {k: sum(float(m[k]) for m in outputs if k in m) for k in METRICS}
            out[(o, fused)] = (grads, metrics)
    return out


def _compare(per_rank: list[dict]) -> list[str]:
    problems = []
    for rank, results in enumerate(per_rank):
        for o, (fields, _) in enumerate(OBJECTIVES):
            (g_ref, m_ref), (g, m) = results[(o, False)], results[(o, True)]
            for name, ref in g_ref.items():
                err = (g[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                if not err <= 1e-5:  # also catches NaN
                    problems.append(f"rank {rank} {fields}: {name} gradient rel error {err:.2e}")
                if name.endswith(("word_embeddings.weight", "output_layer.weight")) and ref.abs().max() == 0:
                    problems.append(f"rank {rank} {fields}: {name} has no gradient")
            for k in METRICS:
                if not math.isclose(m[k], m_ref[k], rel_tol=1e-5, abs_tol=1e-6):
                    problems.append(f"rank {rank} {fields}: metric {k} {m[k]} != {m_ref[k]}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,teacher_pp", [(2, 1, 1), (1, 2, 1)])
def test_fused_training_step_gives_the_logits_gradients(models, tp, pp, teacher_pp):
    """TP=2: the vocab-parallel loss on both ranks, tied embeddings used by the loss directly.
    PP=2: the last stage's copy of the tied embeddings (megatron adds its gradient to the first
    stage's), the teacher on another rank (a replica per rank) sending hidden states and its
    output-layer weight point to point."""
    per_rank = run_distributed(_grads_and_metrics, 2, models["student"], models["teacher"], tp, pp,
                               teacher_pp, timeout=600)
    problems = _compare(per_rank)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- a whole run, with vLLM rollouts

def _runs(root: str, work: str, steps: int) -> None:
    from megatron_opd.config import load_config
    from megatron_opd.testing.tiny_task import base_overrides
    from megatron_opd.train.loop import Trainer

    engine = None
    for fused in (False, True):
        overrides = base_overrides(Path(root), Path(work) / f"fused_{fused}", steps)
        cfg = load_config(None, overrides + [f"loss.fused_linear={str(fused).lower()}"])
        trainer = Trainer(cfg, engine=engine)
        engine = trainer.engine
        trainer.train()
        trainer.close()
    engine.close()


@pytest.mark.vllm
def test_demo_run_loss_curve_is_the_logits_one(task_dir, tmp_path):
    """The tiny demo task at TP=2 (rollouts by vLLM, teacher in process), 3 steps: losses, grad
    norms and trainer-vs-rollout mismatches equal to float tolerance."""
    from megatron_opd.testing.tiny_task import losses

    run_distributed(_runs, 2, str(task_dir), str(tmp_path), 3, timeout=900)
    ref, fused = losses(tmp_path / "fused_False"), losses(tmp_path / "fused_True")
    assert sorted(ref) == sorted(fused) == [1, 2, 3]
    for step in ref:
        for name, a, b in zip(("loss", "grad_norm", "mismatch"), ref[step], fused[step]):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7), (step, name, a, b)
