"""The fused-linear losses against the float64 reference of softmax(h @ W^T), on 1, 2 and 4 gloo ranks.

Every rank builds the same global hidden states and output-layer weights, runs the loss on its
rows of the weights and compares the value, the hidden-state gradient and its shard of the weight
gradient with the reference (the logits version's reference on the logits the full weights give).
Padded weight rows hold NaN: they must never be multiplied. As in test_divergence.py, all sharded
checks run inside one spawned job per TP size and return their worst errors.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.distributed as dist
from test_divergence import (DISTINCT_KINDS, KIND_BETAS, LEAD, TEMPERATURES, TP4, WORLDS, PerWorld,
                             RecordCollectives, expected_collectives, geometries, reference_divergence,
                             reference_log_softmax, rel_err)

from megatron_opd.losses import (fused_linear_divergence, fused_linear_divergence_sum,
                                 fused_linear_token_logprobs, fused_linear_topk_logprobs,
                                 vocab_parallel_divergence)
from megatron_opd.losses import vocab_parallel
from megatron_opd.testing.memory import peak_extra_bytes

HIDDEN, TEACHER_HIDDEN = 6, 9  # neither divides the other nor any vocabulary here
FP32_TOL = 1e-5
# dH = dZ W and dW = dZ^T H sum fp32 products over the vocabulary / the tokens, and dZ's rows sum to
# about 0: measured up to 1.2e-5, the same as the logits version's gradient times W in fp32.
FP32_GRAD_TOL = 3e-5
BF16_VALUE_TOL = 1e-5  # against the reference on the same bf16-rounded logits
BF16_GRAD_TOL = 1.5e-2  # bf16 hidden states and weights, dZ rounded to bf16 for dH (measured <= 6e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- problems and comparison

def make_problem(*, vocab_size: int, world: int, student_width: int, teacher_width: int, seed: int = 0):
    """Hidden states and full (all ranks') weights; padded rows NaN; the teacher's logits share a part
    of the student's (its hidden states extend the student's), so that the divergences are moderate."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*LEAD, HIDDEN, generator=g)
    w = torch.randn(world * student_width, HIDDEN, generator=g) * 1.2
    h_t = torch.cat([h, torch.randn(*LEAD, TEACHER_HIDDEN - HIDDEN, generator=g)], dim=-1)
    w_t = torch.randn(world * teacher_width, TEACHER_HIDDEN, generator=g)
    w_t[:vocab_size, :HIDDEN] = 0.8 * w[:vocab_size]
    w[vocab_size:] = float("nan")
    w_t[vocab_size:] = float("nan")
    mask = torch.rand(LEAD, generator=g) > 0.3
    return h, w, h_t, w_t, mask, torch.randn(LEAD, generator=g, dtype=torch.float64), vocab_size


def rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = w.shape[0] // world
    return w[rank * width:(rank + 1) * width]


def reference(problem, *, dtype, **kw):
    """Value and (dH, dW over the real rows) of the float64 reference on the global logits."""
    h, w, h_t, w_t, mask, grad_out, vocab = problem
    h_ref = h.to(dtype).double().requires_grad_()
    w_ref = w[:vocab].to(dtype).double().requires_grad_()
    s = h_ref @ w_ref.t()
    t = h_t.to(dtype).double() @ w_t[:vocab].to(dtype).double().t()
    if dtype != torch.float32:  # the fused loss sees the logits a matmul in ``dtype`` rounds
        s = s + ((h.to(dtype) @ w[:vocab].to(dtype).t()).double() - s).detach()
        t = (h_t.to(dtype) @ w_t[:vocab].to(dtype).t()).double()
    ref = reference_divergence(s, t, vocab_size=vocab, mask=mask, **kw)
    (ref * grad_out).sum().backward()
    return ref, h_ref.grad, w_ref.grad


def compare(problem, rank, world, group, *, dtype=torch.float32, summed=False, **kw
            ) -> tuple[float, float, float]:
    """(value, hidden-gradient, weight-gradient) errors of this rank against the reference: of
    fused_linear_divergence with the reference's per-token gradient, or (``summed``) of
    fused_linear_divergence_sum with that gradient as the token weights (same gradients)."""
    h, w, h_t, w_t, mask, grad_out, vocab = problem
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref, dh_ref, dw_ref = reference(problem, dtype=dtype, **ref_kw)
    x = h.to(dtype, copy=True).requires_grad_()
    wx = rows(w, rank, world).to(dtype, copy=True).requires_grad_()
    call = dict(kw, loss_mask=mask, vocab_size=vocab, tp_group=group)
    teacher = (None, None)
    if "given_ids" in call:
        call["teacher_topk_ids"] = call.pop("given_ids")
        call["teacher_topk_logprobs"] = call.pop("given_logprobs")
    else:
        teacher = (h_t.to(dtype), rows(w_t, rank, world).to(dtype))
    if summed:
        total, out = fused_linear_divergence_sum(x, wx, *teacher, token_weights=grad_out, **call)
        total.backward()
        weighted = ref * grad_out
        value_err = max(rel_err(out, ref, ref), rel_err(total, weighted.sum(), weighted.abs().sum()))
    else:
        out = fused_linear_divergence(x, wx, *teacher, **call)
        (out * grad_out).sum().backward()
        value_err = rel_err(out, ref, ref)
    assert out.dtype == torch.float32 and x.grad.dtype == dtype and wx.grad.dtype == dtype
    dw_full = torch.zeros(w.shape, dtype=torch.float64)
    dw_full[:vocab] = dw_ref
    return (value_err, rel_err(x.grad, dh_ref, dh_ref), rel_err(wx.grad, rows(dw_full, rank, world), dw_ref))


# ---------------------------------------------------------------- sweeps (run on every rank)

def sweep_full(rank, world, group) -> list[tuple]:
    """Each kind at each temperature once, alternating per-token / summed (so every kind sees both).
    With the padded teacher the loss walks each chunk of logits in pieces of 3 tokens."""
    out = []
    chunks = itertools.cycle((20, 15, None))
    summed = itertools.cycle((False, True))
    for geo_name, geo in geometries(world).items():
        problem = make_problem(**geo)
        with pieces_of_logits(384 if geo_name == "teacher_wider" else None):
            for kind, beta in KIND_BETAS:
                for temperature in TEMPERATURES:
                    chunk, sm = next(chunks), next(summed)
                    errs = compare(problem, rank, world, group, kind=kind, beta=beta, temperature=temperature,
                                   chunk_size=chunk, summed=sm)
                    out.append((f"{geo_name} {kind} beta={beta} T={temperature} chunk={chunk} summed={sm}",)
                               + errs)
    return out


@contextlib.contextmanager
def pieces_of_logits(elements: int | None):
    """Make the loss's pieces (the logits version's default chunk) ``elements`` logits, so that
    tiny vocabularies also run several pieces per chunk of logits."""
    saved = dict(vocab_parallel.CHUNK_ELEMENTS)
    if elements is not None:
        vocab_parallel.CHUNK_ELEMENTS["cpu"] = elements
    try:
        yield
    finally:
        vocab_parallel.CHUNK_ELEMENTS.clear()
        vocab_parallel.CHUNK_ELEMENTS.update(saved)


def sweep_topk(rank, world, group) -> list[tuple]:
    out = []
    geos = geometries(world)
    summed = itertools.cycle((False, True))
    for k, geo_name in ((1, "padded"), (5, "teacher_wider"), (None, "padded")):
        problem = make_problem(**geos[geo_name], seed=1)
        h, w, h_t, w_t, _, _, vocab = problem
        k = k or vocab
        logq = reference_log_softmax(h_t.double() @ w_t[:vocab].double().t(), vocab, 1.0)
        ids = logq.topk(k, dim=-1).indices
        for (kind, beta), temperature in zip(DISTINCT_KINDS, itertools.cycle((0.5, 2.0))):
            for support in ("teacher_topk", "student_topk"):
                sm = next(summed)
                errs = compare(problem, rank, world, group, kind=kind, beta=beta, temperature=temperature,
                               chunk_size=20, support=support, top_k=k, summed=sm)
                out.append((f"{geo_name} {support} k={k} {kind} beta={beta} T={temperature} summed={sm}",)
                           + errs)
            sm = next(summed)
            errs = compare(problem, rank, world, group, kind=kind, beta=beta, temperature=temperature,
                           chunk_size=20, support="teacher_topk", given_ids=ids,
                           given_logprobs=logq.gather(-1, ids).float(), summed=sm)
            out.append((f"{geo_name} given k={k} {kind} beta={beta} T={temperature} summed={sm}",) + errs)
    return out


def sweep_bf16(rank, world, group) -> list[tuple]:
    problem = make_problem(**geometries(world)["teacher_wider"], seed=2)
    out = []
    for (kind, beta), sm in itertools.product(DISTINCT_KINDS, (False, True)):
        errs = compare(problem, rank, world, group, dtype=torch.bfloat16, kind=kind, beta=beta,
                       temperature=1.0, chunk_size=20, summed=sm)
        out.append((f"bf16 full {kind} beta={beta} summed={sm}",) + errs)
    return out


def sweep_logprobs(rank, world, group) -> list[tuple]:
    """fused_linear_token_logprobs (value, both gradients) and fused_linear_topk_logprobs."""
    h, w, _, _, _, grad_out, vocab = make_problem(**geometries(world)["padded"], seed=7)
    ids = torch.randint(0, vocab, LEAD, generator=torch.Generator().manual_seed(8))
    out = []
    for temperature, chunk in zip(TEMPERATURES, (20, 15, None)):
        h_ref, w_ref = h.double().requires_grad_(), w[:vocab].double().requires_grad_()
        logp = reference_log_softmax(h_ref @ w_ref.t(), vocab, temperature)
        ref = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        (ref * grad_out).sum().backward()
        x, wx = h.clone().requires_grad_(), rows(w, rank, world).clone().requires_grad_()
        lp = fused_linear_token_logprobs(x, wx, ids, vocab_size=vocab, tp_group=group,
                                         temperature=temperature, chunk_size=chunk)
        (lp * grad_out).sum().backward()
        dw_full = torch.zeros(w.shape, dtype=torch.float64)
        dw_full[:vocab] = w_ref.grad
        out.append((f"token_logprobs T={temperature} chunk={chunk}", rel_err(lp, ref, ref),
                    rel_err(x.grad, h_ref.grad, h_ref.grad),
                    rel_err(wx.grad, rows(dw_full, rank, world), w_ref.grad)))
        top_ids, top_lp = fused_linear_topk_logprobs(h, rows(w, rank, world), 5, vocab_size=vocab,
                                                     tp_group=group, temperature=temperature,
                                                     chunk_size=chunk)
        ref_lp, ref_ids = logp.detach().topk(5, dim=-1)
        out.append((f"topk_logprobs T={temperature} chunk={chunk}",
                    max(rel_err(top_lp, ref_lp, ref_lp), float((top_ids != ref_ids).any())), 0.0, 0.0))
    return out


def check_hidden_grad_reduction(rank, world, group) -> list[tuple]:
    """Without the all-reduce each rank gets its shard's share, and the shares sum to the full
    gradient; a sequence-parallel caller (hidden states split over the sequence, gathered with
    megatron's mappings) gets its sequence slice of it either way: reduce-scatter of the shares,
    or the split of the all-reduced gradient."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    problem = make_problem(**geometries(world)["padded"], seed=3)
    h, w, h_t, w_t, mask, grad_out, vocab = problem
    _, dh_ref, _ = reference(problem, dtype=torch.float32, kind="jsd", beta=0.3, temperature=1.0)
    kw = dict(kind="jsd", beta=0.3, vocab_size=vocab, tp_group=group, chunk_size=16, loss_mask=mask)
    out = []
    x = h.clone().requires_grad_()
    loss = fused_linear_divergence(x, rows(w, rank, world), h_t, rows(w_t, rank, world),
                                   reduce_hidden_grad=False, **kw)
    (loss * grad_out).sum().backward()
    share = x.grad.clone()
    if world > 1:
        dist.all_reduce(share, group=group)
    out.append(("shares sum to the full gradient", 0.0, rel_err(share, dh_ref, dh_ref), 0.0))
    if world > 1:
        # [s, b, d] layout split over s, as megatron's sequence parallelism leaves the hidden states.
        seq = LEAD[1] // world * world
        h_sbd = h[:, :seq].transpose(0, 1)
        local = h_sbd.chunk(world, dim=0)[rank]
        want = dh_ref[:, :seq].transpose(0, 1).chunk(world, dim=0)[rank]
        sub = (h_t[:, :seq].transpose(0, 1), mask[:, :seq].t(), grad_out[:, :seq].t())
        for reduce, name in ((False, "reduce-scatter"), (True, "all-reduce then split")):
            x_sp = local.clone().requires_grad_()
            full = gather_from_sequence_parallel_region(x_sp, tensor_parallel_output_grad=not reduce,
                                                        group=group)
            loss = fused_linear_divergence(full, rows(w, rank, world), sub[0], rows(w_t, rank, world),
                                           reduce_hidden_grad=reduce, **{**kw, "loss_mask": sub[1]})
            (loss * sub[2]).sum().backward()
            out.append((f"sequence parallel, {name}", 0.0, rel_err(x_sp.grad, want, want), 0.0))
    return out


def check_collectives(rank, world, group) -> list[str]:
    """The logits version's per chunk, plus one all_reduce of the [tokens, d] hidden-state gradient."""
    geo = geometries(world)
    problem = make_problem(**geo["padded"])
    wide = make_problem(**geo["teacher_wider"])
    tokens = math.prod(LEAD)
    chunks = [7] * 6 + [3]
    vocab, width = geo["padded"]["vocab_size"], geo["padded"]["student_width"]
    ids = torch.stack([torch.randperm(vocab)[:5] for _ in range(tokens)]).view(*LEAD, 5)
    recv = min(width, max(0, vocab - rank * width))
    cases = {
        "full": (problem, dict(kind="forward_kl"), {}),
        "jsd": (problem, dict(kind="jsd", beta=0.3), {}),
        "teacher_wider": (wide, dict(kind="reverse_kl"), dict(recv_columns=recv)),
        "topk": (problem, dict(kind="forward_kl", support="teacher_topk", top_k=5), dict(k=5, k_local=5)),
        "given": (problem, dict(kind="forward_kl", support="teacher_topk", teacher_topk_ids=ids,
                                teacher_topk_logprobs=torch.full((*LEAD, 5), -3.0)), dict(k=5)),
    }
    mismatches = []
    for (case, (prob, kw, exp_kw)), summed in itertools.product(cases.items(), (False, True)):
        h, w, h_t, w_t, mask, _, vocab = prob
        x = h.clone().requires_grad_()
        wx = rows(w, rank, world).clone().requires_grad_()
        teacher = (None, None) if "teacher_topk_ids" in kw else (h_t, rows(w_t, rank, world))
        call = dict(kw, vocab_size=vocab, loss_mask=mask, tp_group=group, chunk_size=7)
        with RecordCollectives() as fwd:
            out = (fused_linear_divergence_sum(x, wx, *teacher, **call)[0] if summed
                   else fused_linear_divergence(x, wx, *teacher, **call).sum())
        with RecordCollectives() as bwd:
            out.backward()
        # The logits version's, per piece; the gradient's realignment of teacher columns, and the
        # hidden-state all_reduce, in the forward when summed (the gradient is computed there).
        per_piece = [expected_collectives(case, [c], world, **exp_kw) for c in chunks]
        reduce_h = [("all_reduce", (tokens, HIDDEN))]
        if summed:
            want_fwd, want_bwd = [call for f, b in per_piece for call in f + b] + reduce_h, []
        else:
            want_fwd = [call for f, _ in per_piece for call in f]
            want_bwd = [call for _, b in per_piece for call in b] + reduce_h
        name = f"{case} {'summed' if summed else 'per-token'}"
        if fwd.calls != want_fwd:
            mismatches.append(f"{name} forward: issued {fwd.calls}, documented {want_fwd}")
        if bwd.calls != want_bwd:
            mismatches.append(f"{name} backward: issued {bwd.calls}, documented {want_bwd}")
    return mismatches


def run_checks() -> dict:
    if dist.is_initialized():
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    results = {"full": sweep_full(rank, world, group), "topk": sweep_topk(rank, world, group),
               "bf16": sweep_bf16(rank, world, group), "logprobs": sweep_logprobs(rank, world, group),
               "hidden_grad": check_hidden_grad_reduction(rank, world, group)}
    if world > 1:
        results["collectives"] = check_collectives(rank, world, group)
    return results


# ---------------------------------------------------------------- the tests (parent side)

@pytest.fixture(scope="module")
def runs() -> PerWorld:
    return PerWorld(run_checks)



def _assert_within(per_rank: list[list], value_tol: float, grad_tol: float, what: str) -> None:
    for rank, results in enumerate(per_rank):
        for column, name, tol in ((1, "value", value_tol), (2, "hidden gradient", grad_tol),
                                  (3, "weight gradient", grad_tol)):
            worst = max(results, key=lambda r: r[column] if r[column] == r[column] else math.inf)
            err = worst[column]
            assert err <= tol, f"{what} rank {rank}: {name} rel error {err:.2e} at {worst[0]}"


@pytest.mark.parametrize("world", WORLDS)
def test_full_vocab_matches_float64_reference(runs, world):
    """Every kind, beta in {0, .1, .5, .9, 1}, T in {.5, 1, 2}, chunks dividing the tokens or not, a
    vocabulary not divisible by TP with NaN padding rows, a teacher padded wider, masked tokens."""
    _assert_within([r["full"] for r in runs[world]], FP32_TOL, FP32_GRAD_TOL, f"TP={world} full")


@pytest.mark.parametrize("world", WORLDS)
def test_topk_with_tail_matches_float64_reference(runs, world):
    _assert_within([r["topk"] for r in runs[world]], FP32_TOL, FP32_GRAD_TOL, f"TP={world} top-k")


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_inputs(runs, world):
    _assert_within([r["bf16"] for r in runs[world]], BF16_VALUE_TOL, BF16_GRAD_TOL, f"TP={world} bf16")


@pytest.mark.parametrize("world", WORLDS)
def test_token_logprobs_and_topk_match_float64_reference(runs, world):
    _assert_within([r["logprobs"] for r in runs[world]], FP32_TOL, FP32_GRAD_TOL, f"TP={world} log-probs")


@pytest.mark.parametrize("world", WORLDS)
def test_hidden_gradient_shares_and_sequence_parallel(runs, world):
    _assert_within([r["hidden_grad"] for r in runs[world]], FP32_TOL, FP32_GRAD_TOL,
                   f"TP={world} hidden grad")


@pytest.mark.parametrize("world", (2, TP4))
def test_collectives_are_the_documented_ones(runs, world):
    for rank, r in enumerate(runs[world]):
        assert not r["collectives"], f"TP={world} rank {rank}:\n" + "\n".join(r["collectives"])


# ---------------------------------------------------------------- single-process properties

def _small(tokens=5, hidden=4, width=11, vocab=9):
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    return (torch.randn(tokens, hidden, **f64), torch.randn(width, hidden, **f64) * 1.5,
            torch.randn(tokens, hidden + 1, **f64), torch.randn(width + 2, hidden + 1, **f64) * 1.5, vocab)


@pytest.mark.parametrize("kind,beta", DISTINCT_KINDS)
@pytest.mark.parametrize("support", ["full", "teacher_topk", "student_topk", "given"])
def test_gradcheck_float64(kind, beta, support):
    """Hidden states and weight shard together, padded rows and a masked token included."""
    h, w, h_t, w_t, vocab = _small()
    kw = dict(kind=kind, beta=beta, temperature=0.7, vocab_size=vocab, chunk_size=2,
              loss_mask=torch.tensor([True, False, True, True, True]))
    teacher = (h_t, w_t)
    if support == "given":
        logq = torch.log_softmax((h_t @ w_t[:vocab].t()), -1)
        ids = logq.topk(4, dim=-1).indices
        kw.update(support="teacher_topk", teacher_topk_ids=ids, teacher_topk_logprobs=logq.gather(-1, ids))
        teacher = (None, None)
    elif support != "full":
        kw.update(support=support, top_k=4)
    inputs = (h.clone().requires_grad_(), w.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: fused_linear_divergence(a, b, *teacher, **kw), inputs)


@pytest.mark.parametrize("kind,beta", DISTINCT_KINDS)
@pytest.mark.parametrize("support", ["full", "given"])
def test_gradcheck_summed_float64(kind, beta, support):
    """The weighted sum, gradients computed in the forward; pieces of 2 tokens in chunks of 4."""
    h, w, h_t, w_t, vocab = _small()
    kw = dict(kind=kind, beta=beta, temperature=0.7, vocab_size=vocab, chunk_size=4,
              loss_mask=torch.tensor([True, False, True, True, True]),
              token_weights=torch.tensor([0.5, 2.0, -1.0, 1.0, 3.0], dtype=torch.float64))
    teacher = (h_t, w_t)
    if support == "given":
        logq = torch.log_softmax((h_t @ w_t[:vocab].t()), -1)
        ids = logq.topk(4, dim=-1).indices
        kw.update(support="teacher_topk", teacher_topk_ids=ids, teacher_topk_logprobs=logq.gather(-1, ids))
        teacher = (None, None)
    inputs = (h.clone().requires_grad_(), w.clone().requires_grad_())
    with pieces_of_logits(2 * 9):
        assert torch.autograd.gradcheck(
            lambda a, b: fused_linear_divergence_sum(a, b, *teacher, **kw)[0], inputs)


def test_gradcheck_token_logprobs_float64():
    h, w, _, _, vocab = _small()
    ids = torch.tensor([0, 3, 8, 1, 5])
    inputs = (h.clone().requires_grad_(), w.clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_token_logprobs(a, b, ids, vocab_size=vocab, temperature=1.3, chunk_size=2),
        inputs)


def test_equals_the_logits_version_on_the_same_logits():
    """fp32, megatron's [s, b, d] layout, a frozen weight (no weight gradient is computed)."""
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(7, 2, 16, generator=g), torch.randn(40, 16, generator=g)
    h_t, w_t = torch.randn(7, 2, 12, generator=g), torch.randn(40, 12, generator=g)
    x = h.clone().requires_grad_()
    fused = fused_linear_divergence(x, w, h_t, w_t, kind="reverse_kl", vocab_size=37, chunk_size=3)
    fused.sum().backward()
    z = (h @ w.t()).requires_grad_()
    ref = vocab_parallel_divergence(z, h_t @ w_t.t(), kind="reverse_kl", vocab_size=37)
    ref.sum().backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, z.grad @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_extra_memory_is_per_chunk_not_per_token(support, summed):
    """Peak memory of forward + backward minus the two gradients is the same for 4x the tokens."""
    vocab, hidden, chunk = 3000, 32, 16
    g = torch.Generator().manual_seed(0)
    w, w_t = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    extra = {}
    for num_tokens in (64, 256):
        h = torch.randn(num_tokens, hidden, generator=g).requires_grad_()
        h_t = torch.randn(num_tokens, hidden, generator=g)
        wx = w.clone().requires_grad_()
        kw = dict(kind="jsd", beta=0.5, chunk_size=chunk, support=support,
                  top_k=None if support == "full" else 8)
        if summed:
            step = lambda: fused_linear_divergence_sum(h, wx, h_t, w_t, **kw)[0].backward()  # noqa: E731
        else:
            step = lambda: fused_linear_divergence(h, wx, h_t, w_t, **kw).sum().backward()  # noqa: E731
        peak = peak_extra_bytes(step)
        # The gradients, and the summed version's copies scaled by the incoming gradient.
        extra[num_tokens] = peak - (h.numel() + w.numel()) * 4 * (2 if summed else 1)
    chunk_bytes = chunk * vocab * 4
    assert extra[64] < 10 * chunk_bytes, extra
    assert extra[256] - extra[64] < 192 * 256, extra


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="kl"), "kind must be one of"),
    (dict(kind="forward_kl", vocab_size=50), "vocab_size 50 exceeds the columns of student_lm_head_shard"),
    (dict(kind="forward_kl", w=torch.randn(11, 5)), r"student_lm_head_shard must be \[V_local, hidden=4\]"),
    (dict(kind="forward_kl", w=torch.randn(11, 4).double()), "must share dtype and device"),
    (dict(kind="forward_kl", w_t=None), "teacher_hidden and teacher_lm_head_shard must be given together"),
    (dict(kind="forward_kl", h_t=torch.randn(4, 3)), "teacher_hidden leading shape"),
    (dict(kind="forward_kl", h_t=None, w_t=None), "teacher_hidden is required"),
    (dict(kind="forward_kl", loss_mask=torch.ones(4, dtype=torch.bool)), "loss_mask shape"),
    (dict(kind="forward_kl", teacher_topk_ids=torch.zeros(5, 2, dtype=torch.long),
          teacher_topk_logprobs=torch.zeros(5, 2), support="teacher_topk"), "pass either teacher_hidden"),
])
def test_errors_name_the_argument(kwargs, message):
    kwargs = dict(kwargs)
    h, w = torch.randn(5, 4), kwargs.pop("w", torch.randn(11, 4))
    h_t, w_t = kwargs.pop("h_t", torch.randn(5, 3)), kwargs.pop("w_t", torch.randn(11, 3))
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_divergence(h, w, h_t, w_t, **kwargs)
