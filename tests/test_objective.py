"""The trainer's objective on one process (logits head, no TP) against float64 references: the
loss sum and its gradient for a divergence over the full vocabulary with loss and teacher
temperatures, for a teacher that sent its top-k, and for the sampled-token reverse KL; the metrics
(divergence, trainer-vs-rollout mismatch, top-k overlap); what each objective needs from the teacher.
The sharded and fused-linear versions are checked against this one in test_fused_linear_trainer.py."""

import pytest
import torch

from megatron_opd.teacher.signals import Need, TeacherSignal
from megatron_opd.train.objective import (DivergenceLoss, LogitsHead, Objective, SampledReverseKLLoss,
                                          teacher_need)

pytestmark = pytest.mark.usefixtures("one_thread")

L, V = 13, 37  # tokens of the packed row, vocabulary


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(L, generator=g) > 0.25).float()
    mask[0] = 1.0
    return {"loss_mask": mask.view(1, L), "weights": (0.5 + torch.rand(L, generator=g)).view(1, L),
            "targets": torch.randint(0, V, (1, L), generator=g),
            "on_policy": (torch.arange(L) % 3 != 0).float().view(1, L),
            "rollout_logprobs": -torch.rand(1, L, generator=g)}


def _logits(seed: int) -> torch.Tensor:
    return 2 * torch.randn(1, L, V, generator=torch.Generator().manual_seed(seed))


def _run(loss, batch, signal, student, *, rollout_temperature=1.0):
    objective = Objective(loss, LogitsHead(vocab_size=V, tp_group=None, chunk_size=5),
                          rollout_temperature=rollout_temperature)
    x = student.clone().requires_grad_()
    loss_sum, num_tokens, metrics = objective(x, batch, signal)
    loss_sum.backward()
    return loss_sum, num_tokens, metrics, x.grad


def _reference_metrics(metrics, batch, logp_s, logq_t, divergence, *, rollout_logp, k=8):
    mask = batch["loss_mask"][0].double()
    assert torch.allclose(metrics["divergence_sum"].double(), (divergence * mask).sum(), rtol=1e-5)
    assert metrics["loss_tokens"] == mask.sum()
    onp = mask * batch["on_policy"][0]
    diff = (rollout_logp - batch["rollout_logprobs"][0].double()).abs() * onp
    assert torch.allclose(metrics["mismatch_max"].double(), diff.max(), atol=1e-6)
    assert torch.allclose(metrics["mismatch_sum"].double(), diff.sum(), rtol=1e-5)
    assert metrics["mismatch_tokens"] == onp.sum()
    s_ids, t_ids = logp_s.topk(k).indices, logq_t.topk(k).indices
    overlap = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1).double().mean(-1)
    assert torch.allclose(metrics["topk_overlap_sum"].double(), (overlap * mask).sum(), atol=1e-6)
    assert 0 < metrics["topk_mass_overlap_sum"] <= mask.sum() + 1e-5


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_divergence_over_the_full_vocabulary(kind, beta):
    batch, student, teacher = _batch(), _logits(1), _logits(2)
    loss = DivergenceLoss(kind=kind, beta=beta, temperature=0.7, support="full", top_k=0, teacher_temperature=2.0)
    loss_sum, num_tokens, metrics, grad = _run(loss, batch, TeacherSignal(logits=teacher[0]), student,
                                               rollout_temperature=1.3)

    z = student[0].double().requires_grad_()
    logp, logq = torch.log_softmax(z / 0.7, -1), torch.log_softmax(teacher[0].double() / 2.0, -1)
    p, q = logp.exp(), logq.exp()
    if kind == "reverse_kl":
        per_tok = (p * (logp - logq)).sum(-1)
    elif kind == "forward_kl":
        per_tok = (q * (logq - logp)).sum(-1)
    else:
        logm = torch.log(beta * q + (1 - beta) * p)
        per_tok = beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
    mask, weights = batch["loss_mask"][0].double(), batch["weights"][0].double()
    ref = (per_tok * weights * mask).sum()
    ref.backward()
    assert num_tokens == int(mask.sum()) and num_tokens.dtype == torch.int32
    assert torch.allclose(loss_sum.double(), ref, rtol=1e-5) and metrics["loss_sum"] == loss_sum
    assert torch.allclose(grad[0].double(), z.grad, atol=1e-6)
    rollout_logp = torch.log_softmax(student[0].double() / 1.3, -1).gather(-1, batch["targets"][0, :, None])[:, 0]
    _reference_metrics(metrics, batch, torch.log_softmax(student[0].double(), -1),
                       torch.log_softmax(teacher[0].double(), -1), per_tok.detach(), rollout_logp=rollout_logp)


def test_divergence_on_the_top_k_a_teacher_sent():
    batch, student, teacher = _batch(3), _logits(4), _logits(5)
    k = 4
    t_lps, t_ids = torch.log_softmax(teacher[0], -1).topk(k)
    signal = TeacherSignal(topk_ids=t_ids, topk_logprobs=t_lps)
    loss = DivergenceLoss(kind="forward_kl", beta=0.5, temperature=1.0, support="teacher_topk_input", top_k=k,
                          teacher_temperature=1.0)
    loss_sum, _, metrics, grad = _run(loss, batch, signal, student)

    z = student[0].double().requires_grad_()
    p = torch.softmax(z, -1)
    p_b = torch.cat([p.gather(-1, t_ids), 1 - p.gather(-1, t_ids).sum(-1, keepdim=True)], -1)
    q = t_lps.double().exp()
    q_b = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    per_tok = (q_b * (q_b.log() - p_b.log())).sum(-1)
    mask, weights = batch["loss_mask"][0].double(), batch["weights"][0].double()
    ref = (per_tok * weights * mask).sum()
    ref.backward()
    assert torch.allclose(loss_sum.double(), ref, rtol=1e-5)
    assert torch.allclose(grad[0].double(), z.grad, atol=1e-6)
    # the overlap is over the teacher's k, not the default 8
    s_ids = student[0].topk(k).indices
    overlap = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1).double().mean(-1)
    assert torch.allclose(metrics["topk_overlap_sum"].double(), (overlap * mask).sum(), atol=1e-6)


def test_sampled_reverse_kl_is_a_policy_gradient_with_the_log_ratio_as_advantage():
    batch, student = _batch(6), _logits(7)
    targets = batch["targets"][0]
    t_lp = -3 * torch.rand(L, generator=torch.Generator().manual_seed(8))
    loss = SampledReverseKLLoss(temperature=0.8)
    loss_sum, _, metrics, grad = _run(loss, batch, TeacherSignal(token_logprobs=t_lp), student)

    z = student[0].double().requires_grad_()
    lp = torch.log_softmax(z / 0.8, -1).gather(-1, targets[:, None])[:, 0]
    advantage = -(lp - t_lp.double()).detach()
    mask, weights = batch["loss_mask"][0].double(), batch["weights"][0].double()
    ref = (-advantage * lp * weights * mask).sum()
    ref.backward()
    assert torch.allclose(loss_sum.double(), ref, rtol=1e-5)
    assert torch.allclose(grad[0].double(), z.grad, atol=1e-6)
    assert torch.allclose(metrics["divergence_sum"].double(), (-advantage * mask).sum(), rtol=1e-5)
    assert "topk_overlap_sum" not in metrics  # no teacher distribution to compare with


def test_what_each_objective_needs_from_the_teacher():
    assert teacher_need(kind="reverse_kl", support="full", fused_linear=False) == Need.LOGITS
    assert teacher_need(kind="jsd", support="student_topk", fused_linear=True) == Need.HIDDEN
    assert teacher_need(kind="forward_kl", support="teacher_topk_input", fused_linear=True) == Need.TOPK
    assert teacher_need(kind="sampled_reverse_kl", support="full", fused_linear=True) == Need.TOKEN


def test_sampled_reverse_kl_with_truncated_importance_weights():
    """Each engine-sampled token's policy-gradient term is weighted by min(pi_trainer / pi_rollout,
    cap) at the rollout temperature; other tokens keep weight 1; the divergence is unweighted."""
    batch, student = _batch(9), _logits(10)
    targets = batch["targets"][0]
    t_lp = -3 * torch.rand(L, generator=torch.Generator().manual_seed(11))
    # rollout log-probs near the trainer's, some far below (ratio above the cap)
    exact = torch.log_softmax(student[0].double() / 1.2, -1).gather(-1, targets[:, None])[:, 0]
    noise = 0.3 * torch.randn(L, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    noise[::4] = -2.0
    batch["rollout_logprobs"] = (exact + noise).float().view(1, L)
    loss = SampledReverseKLLoss(temperature=0.8, importance_cap=1.5, rollout_temperature=1.2)
    loss_sum, _, metrics, grad = _run(loss, batch, TeacherSignal(token_logprobs=t_lp), student,
                                      rollout_temperature=1.2)

    z = student[0].double().requires_grad_()
    lp = torch.log_softmax(z / 0.8, -1).gather(-1, targets[:, None])[:, 0]
    ratio = torch.exp(exact - batch["rollout_logprobs"][0].double()).clamp(max=1.5)
    w = torch.where(batch["on_policy"][0] > 0, ratio, torch.ones_like(ratio))
    assert (w == 1.5).any() and (w < 1.5).any() and (w == 1).any()
    advantage = -(lp - t_lp.double()).detach()
    mask, weights = batch["loss_mask"][0].double(), batch["weights"][0].double()
    ref = (-advantage * lp * w * weights * mask).sum()
    ref.backward()
    assert torch.allclose(loss_sum.double(), ref, rtol=1e-5)
    assert torch.allclose(grad[0].double(), z.grad, atol=1e-6)
    divergence = (lp - t_lp.double()).detach()
    assert torch.allclose(metrics["divergence_sum"].double(), (divergence * mask).sum(), rtol=1e-5)


def test_truncated_importance_is_on_by_default_in_bf16_only():
    from megatron_opd.config import LossConfig

    loss = LossConfig(kind="sampled_reverse_kl")
    assert loss.importance_cap_for(torch.bfloat16) == 2.0 and loss.importance_cap_for(torch.float32) is None
    assert LossConfig(kind="sampled_reverse_kl", truncated_importance="on").importance_cap_for(torch.float32) == 2.0
    assert LossConfig(kind="sampled_reverse_kl", truncated_importance="off").importance_cap_for(torch.bfloat16) is None
    assert LossConfig(kind="reverse_kl").importance_cap_for(torch.bfloat16) is None
    with pytest.raises(ValueError, match=r"loss.truncated_importance must be auto, on or off, got 'yes'"):
        LossConfig(truncated_importance="yes").validate()
