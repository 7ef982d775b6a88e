"""The recipe objectives against unsharded float64 references at TP 1/2/4: top-k supports without
the tail bucket (every kind), the policy gradient with reverse-KL advantages over a top-k support
(arXiv 2604.13016's top-k OPD: `reverse_kl_advantage`), both on logits and fused with the output
layer, and the trainer's cross-entropy and policy-gradient objectives with truncated importance
weights. One spawned job per TP size runs every sharded check; the assertions are in the parent.
Single-process: the policy gradients' estimators in expectation over many samples against the
analytic gradient (sign and scale), and a step along them lowers the divergence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_opd.losses import fused_linear_divergence_sum, vocab_parallel_divergence
from megatron_opd.teacher.signals import TeacherSignal
from megatron_opd.train.objective import (CrossEntropyLoss, DivergenceLoss, LogitsHead, SampledReverseKLLoss,
                                          Tokens, TruncatedImportance)
from megatron_opd.testing.multiprocess import run_distributed
from test_divergence import (DISTINCT_KINDS, FP32_TOL, LEAD, geometries, make_problem, reference_kind,
                             reference_log_softmax, rel_err, shard, worst)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- float64 references

def _select(logp, logq, support, top_k, given_ids):
    if given_ids is not None:
        return given_ids
    return (logq if support == "teacher_topk" else logp).detach().topk(top_k, dim=-1).indices


def reference_no_tail(s, t, *, kind, beta, temperature, vocab_size, mask, support, top_k=None, given_ids=None,
                      given_logprobs=None, tail=False):
    """Both distributions renormalized over the k selected tokens."""
    logp = reference_log_softmax(s, vocab_size, temperature)
    logq = None if t is None else reference_log_softmax(t, vocab_size, temperature)
    ids = _select(logp, logq, support, top_k, given_ids)
    sel_q = given_logprobs.double() if given_ids is not None else logq.gather(-1, ids)
    sel_p = torch.log_softmax(logp.gather(-1, ids), -1)
    return torch.where(mask, reference_kind(sel_p, torch.log_softmax(sel_q, -1), kind, beta), 0.0)


def reference_advantage(s, t, *, temperature, vocab_size, mask, support, top_k, tail, given_ids=None,
                        given_logprobs=None):
    """The top-k OPD estimator written as autograd sees it: per support token x, the stop-gradient
    advantage A_x = -w_x (log p_x - log q_x), w the student's probability renormalized over the
    support (no tail) or the buckets' own (with the tail bucket), and the surrogate -sum A_x log p_x.
    Returned with the value sum_x -A_x and the surrogate's gradient."""
    logp = reference_log_softmax(s, vocab_size, temperature)
    logq = None if t is None else reference_log_softmax(t, vocab_size, temperature)
    if support == "full":
        lp, lq = logp, logq
    else:
        ids = _select(logp, logq, support, top_k, given_ids)
        lp = logp.gather(-1, ids)
        lq = given_logprobs.double() if given_ids is not None else logq.gather(-1, ids)
        if tail and ids.shape[-1] < vocab_size:
            rest = lambda lx: torch.logsumexp(lx.scatter(-1, ids, float("-inf")), -1, keepdim=True)
            lq_rest = (torch.log1p(-lq.exp().sum(-1, keepdim=True)) if given_ids is not None else rest(logq))
            lp, lq = torch.cat([lp, rest(logp)], -1), torch.cat([lq, lq_rest], -1)
    w = lp.exp() if (tail or support == "full") else torch.softmax(lp, -1)
    minus_advantage = (w * (lp - lq)).detach()
    surrogate = (minus_advantage * lp).sum(-1)
    value = minus_advantage.sum(-1)
    return torch.where(mask, value + surrogate - surrogate.detach(), 0.0)


# ---------------------------------------------------------------- sharded checks (every rank)

def _compare(problem, rank, world, group, reference, *, fused=False, **kw):
    """(value error, gradient error) of the logits (or fused) loss on this rank's shard."""
    s, t, mask, grad_out, vocab = problem
    given = "given_ids" in kw
    s_ref = s.double().requires_grad_()
    ref = reference(s_ref, None if given else t, vocab_size=vocab, mask=mask, **kw)
    (ref * grad_out).sum().backward()
    call = {k: v for k, v in kw.items() if k not in ("given_ids", "given_logprobs", "tail")}
    if given:
        call.update(teacher_topk_ids=kw["given_ids"], teacher_topk_logprobs=kw["given_logprobs"])
    if "tail" in kw:
        call["topk_tail"] = kw["tail"]
    if not fused:
        x = shard(s, rank, world).clone().requires_grad_()
        out = vocab_parallel_divergence(x, None if given else shard(t, rank, world), loss_mask=mask,
                                        vocab_size=vocab, tp_group=group, chunk_size=None, **call)
        (out * grad_out).sum().backward()
        return rel_err(out, ref, ref), rel_err(x.grad, shard(s_ref.grad, rank, world), s_ref.grad)
    return _compare_fused(problem, rank, world, group, reference, kw, call)


def _compare_fused(problem, rank, world, group, reference, kw, call):
    """The same loss fused with the output layer: logits = h @ W^T, W sharded by rows; the weighted
    sum version (what the trainer calls)."""
    _, _, mask, grad_out, vocab = problem
    g = torch.Generator().manual_seed(7)
    d, width = 12, problem[0].shape[-1] // world
    h_s, h_t = torch.randn(*LEAD, d, generator=g), torch.randn(*LEAD, d, generator=g)
    w_s, w_t = torch.randn(world * width, d, generator=g), torch.randn(world * width, d, generator=g)
    given = "given_ids" in kw
    hs_ref, ws_ref = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    ref = reference(hs_ref @ ws_ref.T, None if given else (h_t.double() @ w_t.double().T), vocab_size=vocab,
                    mask=mask, **kw)
    (ref * grad_out).sum().backward()
    x, w = h_s.clone().requires_grad_(), shard(w_s.T, rank, world).T.clone().requires_grad_()
    teacher = (None, None) if given else (h_t, shard(w_t.T, rank, world).T.contiguous())
    total, per_tok = fused_linear_divergence_sum(x, w, *teacher, token_weights=grad_out.float(), loss_mask=mask,
                                                 vocab_size=vocab, tp_group=group, chunk_size=20, **call)
    total.backward()
    ref_w = shard(ws_ref.grad.T, rank, world).T
    return (rel_err(per_tok, ref.detach(), ref.detach()),
            max(rel_err(x.grad, hs_ref.grad, hs_ref.grad), rel_err(w.grad, ref_w, ws_ref.grad)))


def sweep_no_tail(rank, world, group) -> list[tuple[str, float, float]]:
    out = []
    for geo_name, geo in geometries(world).items():
        problem = make_problem(**geo, seed=3)
        _, t, _, _, vocab = problem
        for k in ((1, 16) if geo_name == "padded" else (5,)):
            logq = reference_log_softmax(t, vocab, 1.0)
            ids = logq.topk(k, dim=-1).indices
            given = dict(given_ids=ids, given_logprobs=logq.gather(-1, ids).float())
            for kind, beta in DISTINCT_KINDS:
                for support, extra in (("student_topk", {}), ("teacher_topk", {}), ("teacher_topk", given)):
                    kw = dict(kind=kind, beta=beta, temperature=0.7, support=support, tail=False, **extra)
                    if not extra:
                        kw["top_k"] = k
                    ev, eg = _compare(problem, rank, world, group, reference_no_tail, **kw)
                    out.append((f"{geo_name} {support}{' given' if extra else ''} k={k} {kind} beta={beta}", ev, eg))
    return out


def sweep_advantage(rank, world, group) -> list[tuple[str, float, float]]:
    out = []
    for geo_name, geo in geometries(world).items():
        problem = make_problem(**geo, seed=4)
        _, t, _, _, vocab = problem
        ks = (1, 16, vocab) if geo_name == "padded" else (16,)
        cases = [("full", None, True)] + [(sup, k, tail) for sup in ("student_topk", "teacher_topk")
                                          for k in ks for tail in (True, False)]
        for support, k, tail in cases:
            for temperature in ((1.0, 0.6) if k == 16 else (0.6,)):
                kw = dict(kind="reverse_kl_advantage", temperature=temperature, support=support)
                ref_kw = dict(temperature=temperature, support=support, top_k=k, tail=tail)
                if support != "full":
                    kw.update(top_k=k, topk_tail=tail)
                ev, eg = _compare_advantage(problem, rank, world, group, kw, ref_kw)
                out.append((f"{geo_name} {support} k={k} tail={tail} T={temperature}", ev, eg))
        logq = reference_log_softmax(t, vocab, 1.0)
        ids = logq.topk(16, dim=-1).indices
        for tail in (True, False):
            given = dict(given_ids=ids, given_logprobs=logq.gather(-1, ids).float())
            ev, eg = _compare(problem, rank, world, group, reference_advantage_given, tail=tail,
                              kind="reverse_kl_advantage", support="teacher_topk", **given)
            out.append((f"{geo_name} given k=16 tail={tail}", ev, eg))
        for tail in (True, False):
            ev, eg = _compare(problem, rank, world, group, reference_advantage_given, fused=True, tail=tail,
                              kind="reverse_kl_advantage", support="student_topk", top_k=16)
            out.append((f"{geo_name} fused student_topk k=16 tail={tail}", ev, eg))
        for kind, beta in DISTINCT_KINDS[:2]:
            ev, eg = _compare(problem, rank, world, group, reference_no_tail, fused=True, kind=kind, beta=beta,
                              temperature=1.0, support="student_topk", top_k=16, tail=False)
            out.append((f"{geo_name} fused no-tail {kind}", ev, eg))
    return out


def reference_advantage_given(s, t, *, kind, vocab_size, mask, support, tail, top_k=None, temperature=1.0,
                              given_ids=None, given_logprobs=None, beta=None):
    assert kind == "reverse_kl_advantage"
    return reference_advantage(s, t, temperature=temperature, vocab_size=vocab_size, mask=mask, support=support,
                               top_k=top_k, tail=tail, given_ids=given_ids, given_logprobs=given_logprobs)


def _compare_advantage(problem, rank, world, group, kw, ref_kw):
    s, t, mask, grad_out, vocab = problem
    s_ref = s.double().requires_grad_()
    ref = reference_advantage(s_ref, t, vocab_size=vocab, mask=mask, **ref_kw)
    (ref * grad_out).sum().backward()
    x = shard(s, rank, world).clone().requires_grad_()
    out = vocab_parallel_divergence(x, shard(t, rank, world), loss_mask=mask, vocab_size=vocab, tp_group=group,
                                    chunk_size=None, **kw)
    (out * grad_out).sum().backward()
    return rel_err(out, ref, ref), rel_err(x.grad, shard(s_ref.grad, rank, world), s_ref.grad)


def sweep_objectives(rank, world, group) -> list[tuple[str, float, float]]:
    """The trainer's objectives on a logits head over TP shards: cross-entropy, and the policy
    gradient over the student's top-16 without tail with truncated importance weights."""
    geo = geometries(world)["padded"]
    s, t, mask, _, vocab = make_problem(**geo, seed=5)
    g = torch.Generator().manual_seed(8)
    L = s[0].shape[0]
    z, zt, m = s[0], t[0], mask[0]
    targets = torch.randint(0, vocab, (L,), generator=g)
    on_policy = (torch.arange(L) % 3 != 0).float()
    exact = torch.log_softmax(z[:, :vocab].double(), -1).gather(-1, targets[:, None])[:, 0]
    rollout_lp = (exact + 0.3 * torch.randn(L, generator=g, dtype=torch.float64)).float()
    rollout_lp[::4] -= 2.0
    tokens = Tokens(m.float(), 0.5 + torch.rand(L, generator=g), targets, on_policy, rollout_lp)
    head = LogitsHead(vocab_size=vocab, tp_group=group, chunk_size=7)
    out = []
    for name, loss in (("cross_entropy", CrossEntropyLoss(temperature=0.9)),
                       ("advantage", DivergenceLoss(kind="reverse_kl_advantage", beta=0.5, temperature=1.0,
                                                    support="student_topk", top_k=16, teacher_temperature=1.0,
                                                    topk_tail=False,
                                                    importance=TruncatedImportance(1.5, rollout_temperature=1.0)))):
        x = shard(z, rank, world).clone().requires_grad_()
        signal = TeacherSignal(logits=shard(zt, rank, world))
        loss_sum, _ = loss(head, x, tokens, signal)
        loss_sum.backward()
        z_ref = z.double().requires_grad_()
        w = tokens.weights.double() * tokens.mask.double()
        if name == "cross_entropy":
            ref = -(reference_log_softmax(z_ref, vocab, 0.9).gather(-1, targets[:, None])[:, 0] * w).sum()
        else:
            ratio = torch.exp(exact - rollout_lp.double()).clamp(max=1.5)
            ratio = torch.where(on_policy > 0, ratio, 1.0)
            assert (ratio == 1.5).any() and (ratio < 1).any()
            per_tok = reference_advantage(z_ref, zt, temperature=1.0, vocab_size=vocab, mask=m.bool(),
                                          support="student_topk", top_k=16, tail=False)
            ref = (per_tok * ratio * w).sum()
        ref.backward()
        out.append((name, rel_err(loss_sum, ref, ref), rel_err(x.grad, shard(z_ref.grad, rank, world), z_ref.grad)))
    return out


def run_checks() -> dict:
    if dist.is_initialized():
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    return {"no_tail": sweep_no_tail(rank, world, group), "advantage": sweep_advantage(rank, world, group),
            "objectives": sweep_objectives(rank, world, group)}


# ---------------------------------------------------------------- the tests (parent side)

class PerWorld(dict):
    def __missing__(self, world: int) -> list:
        if world > 1:
            self[world] = run_distributed(run_checks, world)
        else:
            self[world] = [run_checks()]
        return self[world]


@pytest.fixture(scope="module")
def runs() -> PerWorld:
    return PerWorld()


WORLDS = (1, 2, pytest.param(4, marks=pytest.mark.slow))


def _assert_within(per_rank, what, value_tol=FP32_TOL, grad_tol=FP32_TOL):
    for rank, results in enumerate(per_rank):
        ev, eg, where_v, where_g = worst(results)
        assert ev <= value_tol, f"{what} rank {rank}: value rel error {ev:.2e} at {where_v}"
        assert eg <= grad_tol, f"{what} rank {rank}: gradient rel error {eg:.2e} at {where_g}"


@pytest.mark.parametrize("world", WORLDS)
def test_topk_without_tail_matches_float64_reference(runs, world):
    """Every distinct kind over student / teacher / given top-k (k in 1, 5, 16) renormalized over the
    k tokens; logits and fused with the output layer."""
    _assert_within([r["no_tail"] for r in runs[world]], f"TP={world} no tail")


@pytest.mark.parametrize("world", WORLDS)
def test_reverse_kl_advantage_matches_float64_estimator(runs, world):
    """The top-k OPD policy gradient: value and gradient equal autograd's on the float64 surrogate
    -sum sg(A_x) log p_x (sign and scale), full / student / teacher / given top-k, with and without
    the tail, T in {1, 0.6}, logits and fused."""
    _assert_within([r["advantage"] for r in runs[world]], f"TP={world} advantage", grad_tol=3e-5)


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_objectives_match_float64_reference(runs, world):
    """cross_entropy and reverse_kl_advantage (student top-16, no tail, truncated importance weights
    of 1.5) through the trainer's loss classes on a sharded logits head."""
    _assert_within([r["objectives"] for r in runs[world]], f"TP={world} objectives")


# ---------------------------------------------------------------- single process: expectations

def _problem(seed=0, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(vocab, generator=g, dtype=torch.float64), 1.5 * torch.randn(vocab, generator=g,
                                                                                        dtype=torch.float64)


def _analytic_rkl_grad(z, zt):
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    p = logp.exp()
    return p * (logp - logq - (p * (logp - logq)).sum())


def test_sampled_reverse_kl_estimator_expectation_is_the_analytic_gradient():
    """Mean over 200k tokens sampled from the student of the trainer's sampled_reverse_kl gradient
    (its SampledReverseKLLoss) -> the analytic gradient of KL(p || q), within 5 standard errors, and
    reverse_kl_advantage over the full vocabulary gives that gradient exactly."""
    z, zt = _problem()
    n, vocab = 200_000, z.shape[0]
    y = torch.multinomial(torch.softmax(z, -1), n, replacement=True, generator=torch.Generator().manual_seed(1))
    x = z.expand(n, vocab).clone().requires_grad_()
    t_lp = torch.log_softmax(zt, -1)[y]
    ones = torch.ones(n, dtype=torch.float64)
    tokens = Tokens(ones, ones, y, torch.zeros(n), torch.zeros(n))
    head = LogitsHead(vocab_size=vocab, tp_group=None, chunk_size=None)
    loss_sum, _ = SampledReverseKLLoss(temperature=1.0)(head, x, tokens, TeacherSignal(token_logprobs=t_lp))
    loss_sum.backward()
    mc, analytic = x.grad.mean(0), _analytic_rkl_grad(z, zt)
    stderr = x.grad.std(0) / n ** 0.5
    assert analytic.abs().max() > 0.05
    assert ((mc - analytic).abs() <= 5 * stderr + 1e-12).all(), (mc, analytic, stderr)
    assert torch.sign(mc[analytic.abs() > 10 * stderr]).eq(torch.sign(analytic[analytic.abs() > 10 * stderr])).all()
    xa = z.view(1, vocab).clone().requires_grad_()
    vocab_parallel_divergence(xa, zt.view(1, vocab), kind="reverse_kl_advantage").sum().backward()
    assert torch.allclose(xa.grad[0], analytic, atol=1e-12)


def test_topk_advantage_is_the_expectation_over_the_students_topk():
    """Without the tail, the top-k policy gradient is the expectation of the sampled-token estimator
    (lp(y) - lq(y)) grad log p(y) with y drawn from the student renormalized over its top-k: Monte
    Carlo over 200k draws agrees within 5 standard errors (sign and scale)."""
    z, zt = _problem(2, vocab=11)
    k, n = 4, 200_000
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    ids = logp.topk(k).indices
    y = ids[torch.multinomial(torch.softmax(logp[ids], -1), n, replacement=True,
                              generator=torch.Generator().manual_seed(3))]
    per_sample = (logp[y] - logq[y]).unsqueeze(-1) * (torch.nn.functional.one_hot(y, z.shape[0]) - logp.exp())
    mc, stderr = per_sample.mean(0), per_sample.std(0) / n ** 0.5
    xa = z.view(1, -1).clone().requires_grad_()
    value = vocab_parallel_divergence(xa, zt.view(1, -1), kind="reverse_kl_advantage", support="student_topk",
                                      top_k=k, topk_tail=False)
    value.sum().backward()
    ours = xa.grad[0]
    assert ((mc - ours).abs() <= 5 * stderr + 1e-12).all(), (mc, ours, stderr)
    w = torch.softmax(logp[ids], -1)
    assert torch.allclose(value[0], (w * (logp[ids] - logq[ids])).sum())



def test_topk_tail_false_needs_a_topk_support():
    with pytest.raises(ValueError, match="topk_tail=False needs support"):
        vocab_parallel_divergence(torch.randn(2, 5), torch.randn(2, 5), kind="reverse_kl", topk_tail=False)
