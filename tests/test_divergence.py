"""The vocab-parallel losses against an unsharded float64 reference, on 1, 2 and 4 gloo ranks.

Every rank builds the same global logits, runs the loss on its vocab shard and compares the value
and its shard of the gradient with the reference. All sharded checks of megatron_opd.losses
(divergences, and the token log-prob helpers) run inside one spawned job per TP size (spawning
costs seconds) and return their worst errors; the assertions are in the parent.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from megatron_opd.losses import (sampled_token_reverse_kl, token_logprobs, topk_logprobs,
                                 vocab_parallel_divergence)
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.memory import peak_extra_bytes

KIND_BETAS = [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
# Each distinct formula once (jsd at beta 0 / 1 is forward / reverse KL), for the costlier sweeps.
DISTINCT_KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.9)]
TEMPERATURES = (0.5, 1.0, 2.0)
LEAD = (3, 15)  # 45 tokens: chunks of 20 (or 7) do not divide it, chunks of 15 do
CHUNK_SIZES = (20, 15, None)
FP32_TOL = 1e-5
BF16_GRAD_TOL = 1e-2  # the gradient is rounded to bf16 (8 bits of mantissa) on the way out


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the float64 reference, unsharded

def reference_kind(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (q * (logq - logp)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (p * (logp - logq)).sum(-1)
    logm = torch.log(beta * q + (1 - beta) * p)
    return beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)


def reference_log_softmax(z: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    return torch.log_softmax(z[..., :vocab_size].double() / temperature, dim=-1)


def reference_buckets(logp: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probs of the selected ids plus the rest bucket (none when ids cover the vocabulary)."""
    selected = logp.gather(-1, ids)
    if ids.shape[-1] == vocab_size:
        return selected
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([selected, rest], dim=-1)


def reference_divergence(s, t, *, kind, beta, temperature, vocab_size, mask, support="full", top_k=None,
                         given_ids=None, given_logprobs=None):
    logp = reference_log_softmax(s, vocab_size, temperature)
    if given_ids is not None:
        logp = reference_buckets(logp, given_ids, vocab_size)
        logq = given_logprobs.double()
        if given_ids.shape[-1] < vocab_size:
            logq = torch.cat([logq, torch.log1p(-logq.exp().sum(-1, keepdim=True))], dim=-1)
    else:
        logq = reference_log_softmax(t, vocab_size, temperature)
        if support != "full":
            ids = (logq if support == "teacher_topk" else logp).detach().topk(top_k, dim=-1).indices
            logp, logq = reference_buckets(logp, ids, vocab_size), reference_buckets(logq, ids, vocab_size)
    return torch.where(mask, reference_kind(logp, logq, kind, beta), 0.0)


# ---------------------------------------------------------------- problems and comparison

def make_problem(*, vocab_size: int, world: int, student_width: int, teacher_width: int, seed: int = 0):
    """Global logits with big values in the padded columns (they must get no mass), a mask, a grad."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*LEAD, world * student_width, generator=g) * 3
    t = torch.full((*LEAD, world * teacher_width), 50.0)
    t[..., :vocab_size] = 0.6 * s[..., :vocab_size] + 2 * torch.randn(*LEAD, vocab_size, generator=g)
    s[..., vocab_size:] = 50.0
    mask = torch.rand(LEAD, generator=g) > 0.3
    return s, t, mask, torch.randn(LEAD, generator=g, dtype=torch.float64), vocab_size


def geometries(world: int) -> dict[str, dict]:
    """An odd vocabulary (not divisible by TP 2 or 4) in shards padded past it (3 to 15 padded
    columns, the last rank's shard partly real), as megatron pads; then a teacher padded wider."""
    vocab = 101 * world + 1
    width = -(-vocab // world) + 3
    return {"padded": dict(vocab_size=vocab, world=world, student_width=width, teacher_width=width),
            "teacher_wider": dict(vocab_size=vocab, world=world, student_width=width,
                                  teacher_width=width + 5)}


def shard(z: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = z.shape[-1] // world
    return z[..., rank * width:(rank + 1) * width]


def rel_err(ours: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / scale.abs().max().clamp_min(1e-30)).item()


def compare(problem, rank, world, group, *, dtype=torch.float32, **kw) -> tuple[float, float]:
    """(value error, gradient error) of this rank's run against the reference, relative to its max."""
    s, t, mask, grad_out, vocab = problem
    s, t = s.to(dtype), t.to(dtype)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    s_ref = s.double().requires_grad_()
    ref = reference_divergence(s_ref, t, vocab_size=vocab, mask=mask, **ref_kw)
    (ref * grad_out).sum().backward()
    x = shard(s, rank, world).clone().requires_grad_()
    teacher = None if "given_ids" in kw else shard(t, rank, world)
    call_kw = dict(kw)
    if "given_ids" in call_kw:
        call_kw["teacher_topk_ids"], call_kw["teacher_topk_logprobs"] = (call_kw.pop("given_ids"),
                                                                         call_kw.pop("given_logprobs"))
    out = vocab_parallel_divergence(x, teacher, loss_mask=mask, vocab_size=vocab, tp_group=group, **call_kw)
    (out * grad_out).sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == dtype
    return rel_err(out, ref, ref), rel_err(x.grad, shard(s_ref.grad, rank, world), s_ref.grad)


def _nan_is_worst(x: float) -> float:
    return math.inf if math.isnan(x) else x


def worst(results: list[tuple[str, float, float]]) -> tuple[float, float, str, str]:
    """The largest value and gradient errors (NaN counts as the largest) and their cases."""
    value = max(results, key=lambda r: _nan_is_worst(r[1]))
    grad = max(results, key=lambda r: _nan_is_worst(r[2]))
    return value[1], grad[2], value[0], grad[0]


# ---------------------------------------------------------------- sweeps (run on every rank)

def sweep_full(rank, world, group) -> list[tuple[str, float, float]]:
    out = []
    for geo_name, geo in geometries(world).items():
        problem = make_problem(**geo)
        for kind, beta in KIND_BETAS:
            for temperature in TEMPERATURES:
                for chunk_size in CHUNK_SIZES:
                    ev, eg = compare(problem, rank, world, group, kind=kind, beta=beta,
                                     temperature=temperature, chunk_size=chunk_size)
                    out.append((f"{geo_name} {kind} beta={beta} T={temperature} chunk={chunk_size}", ev, eg))
    return out


def sweep_topk(rank, world, group) -> list[tuple[str, float, float]]:
    out = []
    for geo_name, geo in geometries(world).items():
        problem = make_problem(**geo, seed=1)
        s, t, _, _, vocab = problem
        for k in (1, 5, vocab):
            ids = reference_log_softmax(t, vocab, 1.0).topk(k, dim=-1).indices
            given = reference_log_softmax(t, vocab, 1.0).gather(-1, ids).float()
            for kind, beta in DISTINCT_KINDS:
                for temperature in (0.5, 2.0):
                    for support in ("teacher_topk", "student_topk"):
                        ev, eg = compare(problem, rank, world, group, kind=kind, beta=beta,
                                         temperature=temperature, chunk_size=20, support=support, top_k=k)
                        out.append((f"{geo_name} {support} k={k} {kind} beta={beta} T={temperature}", ev, eg))
                    ev, eg = compare(problem, rank, world, group, kind=kind, beta=beta,
                                     temperature=temperature, chunk_size=20, support="teacher_topk",
                                     given_ids=ids, given_logprobs=given)
                    out.append((f"{geo_name} given k={k} {kind} beta={beta} T={temperature}", ev, eg))
    return out


def sweep_bf16(rank, world, group) -> list[tuple[str, float, float]]:
    """bf16 logits; top-k from given ids (bf16 logits tie often, and ties make any top-k ambiguous)."""
    problem = make_problem(**geometries(world)["teacher_wider"], seed=2)
    _, t, _, _, vocab = problem
    logq = reference_log_softmax(t.bfloat16(), vocab, 1.0)
    ids = logq.topk(5, dim=-1).indices
    out = []
    for kind, beta in KIND_BETAS:
        ev, eg = compare(problem, rank, world, group, dtype=torch.bfloat16, kind=kind, beta=beta,
                         temperature=1.0, chunk_size=20)
        out.append((f"bf16 full {kind} beta={beta}", ev, eg))
        ev, eg = compare(problem, rank, world, group, dtype=torch.bfloat16, kind=kind, beta=beta,
                         temperature=1.0, chunk_size=20, support="teacher_topk", given_ids=ids,
                         given_logprobs=logq.gather(-1, ids).float())
        out.append((f"bf16 given top-5 {kind} beta={beta}", ev, eg))
    return out


def sweep_extreme(rank, world, group) -> list[str]:
    """Failures (non-finite values or gradients) at T = 0.05 and logits of +-1e4 or -inf."""
    g = torch.Generator().manual_seed(3)
    vocab = 24 * world
    s, t = ((torch.randint(0, 2, (2, *LEAD, vocab), generator=g) * 2 - 1).float() * 1e4).unbind(0)
    one_hot = torch.full((*LEAD, vocab), float("-inf"))
    one_hot.scatter_(-1, torch.randint(0, vocab, (*LEAD, 1), generator=g), 0.0)
    failures = []
    for pair_name, student, teacher in (("+-1e4 vs +-1e4", s, t), ("+-1e4 vs -inf one-hot", s, one_hot),
                                        ("-inf one-hot vs +-1e4", one_hot, t)):
        for kind, beta in DISTINCT_KINDS:
            for temperature in (0.05, 1.0):
                for support in ("full", "teacher_topk", "student_topk"):
                    x = shard(student, rank, world).clone().requires_grad_()
                    out = vocab_parallel_divergence(
                        x, shard(teacher, rank, world), kind=kind, beta=beta, temperature=temperature,
                        tp_group=group, chunk_size=20, support=support,
                        top_k=None if support == "full" else 3)
                    out.sum().backward()
                    if not (out.isfinite().all() and x.grad.isfinite().all()):
                        failures.append(f"{pair_name} {support} {kind} beta={beta} T={temperature}")
    return failures


class RecordCollectives(contextlib.AbstractContextManager):
    """Wraps torch.distributed's collectives and records (name, shape of the first tensor) per call."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_to_all",
             "all_to_all_single",
             "broadcast", "reduce_scatter", "reduce_scatter_tensor", "send", "recv", "barrier")

    def __enter__(self):
        self.calls, self._saved = [], {}
        for name in self.NAMES:
            original = self._saved[name] = getattr(dist, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.calls.append((_name, tuple(first.shape) if first is not None else None))
                return _original(*args, **kwargs)
            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def expected_collectives(case: str, chunks: list[int], world: int, *, k: int = 0, k_local: int = 0,
                         recv_columns: int = 0) -> tuple[list, list]:
    """The documented collectives of one call, per chunk of c tokens: (forward, backward)."""
    forward, backward = [], []
    for c in chunks:
        if case == "teacher_wider":
            forward.append(("all_to_all_single", (recv_columns, c)))
            backward.append(("all_to_all_single", (recv_columns, c)))
        if case in ("full", "jsd", "teacher_wider"):
            forward += [("all_gather_single", (world * c, 4)),
                        ("all_reduce", (c, 2 if case == "jsd" else 1))]
        if case == "topk":
            forward += [("all_gather_single", (world * c, k_local, 2)),
                        ("all_gather_single", (world * c, k + 4))]
        if case == "given":
            forward.append(("all_gather_single", (world * c, k + 2)))
    return forward, backward


def check_collectives(rank, world, group) -> list[str]:
    """Mismatches between the collectives issued and the documented list."""
    geo = geometries(world)
    problem = make_problem(**geo["padded"])
    wide = make_problem(**geo["teacher_wider"])
    chunks = [7] * 6 + [3]  # 45 tokens in chunks of 7
    vocab, width = geo["padded"]["vocab_size"], geo["padded"]["student_width"]
    ids = torch.stack([torch.randperm(vocab)[:5] for _ in range(math.prod(LEAD))]).view(*LEAD, 5)
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
    for case, (prob, kw, exp_kw) in cases.items():
        s, t, mask, _, vocab = prob
        x = shard(s, rank, world).clone().requires_grad_()
        teacher = None if "teacher_topk_ids" in kw else shard(t, rank, world)
        with RecordCollectives() as fwd:
            out = vocab_parallel_divergence(x, teacher, vocab_size=vocab, loss_mask=mask, tp_group=group,
                                            chunk_size=7, **kw)
        with RecordCollectives() as bwd:
            out.sum().backward()
        want_fwd, want_bwd = expected_collectives(case, chunks, world, **exp_kw)
        if fwd.calls != want_fwd:
            mismatches.append(f"{case} forward: issued {fwd.calls}, documented {want_fwd}")
        if bwd.calls != want_bwd:
            mismatches.append(f"{case} backward: issued {bwd.calls}, documented {want_bwd}")
    return mismatches


def check_megatron_cross_entropy(rank, world) -> tuple[float, float]:
    """Forward KL against a one-hot teacher vs megatron-core's vocab_parallel_cross_entropy."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(4)
    seq, batch, width = 9, 4, 51
    logits = torch.randn(seq, batch, world * width, generator=g) * 4
    target = torch.randint(0, world * width, (seq, batch), generator=g)
    grad_out = torch.randn(seq, batch, generator=g)
    one_hot = torch.full_like(logits, float("-inf")).scatter_(-1, target.unsqueeze(-1), 0.0)

    x_ce = shard(logits, rank, world).clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(x_ce.clone(), target)
    (ce * grad_out).sum().backward()
    x_kl = shard(logits, rank, world).clone().requires_grad_()
    kl = vocab_parallel_divergence(x_kl, shard(one_hot, rank, world), kind="forward_kl", tp_group=group,
                                   chunk_size=10)
    (kl * grad_out).sum().backward()
    return rel_err(kl, ce.double(), ce), rel_err(x_kl.grad, x_ce.grad.double(), x_ce.grad)


def sweep_logprobs(rank, world, group) -> list[tuple[str, float, float]]:
    """token_logprobs, sampled_token_reverse_kl and topk_logprobs on padded shards."""
    s, t, mask, grad_out, vocab = make_problem(**geometries(world)["padded"], seed=7)
    ids = torch.randint(0, vocab, LEAD, generator=torch.Generator().manual_seed(8))
    teacher_lp = reference_log_softmax(t, vocab, 1.0).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    out = []
    for temperature in TEMPERATURES:
        for chunk_size in (20, None):
            s_ref = s.double().requires_grad_()
            ref = reference_log_softmax(s_ref, vocab, temperature).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            ref_kl = torch.where(mask, ref - teacher_lp, 0.0)
            (ref_kl * grad_out).sum().backward()
            x = shard(s, rank, world).clone().requires_grad_()
            lp = token_logprobs(x, ids, vocab_size=vocab, tp_group=group, temperature=temperature,
                                chunk_size=chunk_size)
            kl = sampled_token_reverse_kl(x, torch.where(mask, ids, -100), teacher_lp.float(), loss_mask=mask,
                                          vocab_size=vocab, tp_group=group, temperature=temperature,
                                          chunk_size=chunk_size)
            (kl * grad_out).sum().backward()
            out.append((f"token_logprobs T={temperature} chunk={chunk_size}", rel_err(lp, ref, ref), 0.0))
            out.append((f"sampled_token_reverse_kl T={temperature} chunk={chunk_size}",
                        rel_err(kl, ref_kl, ref_kl),
                        rel_err(x.grad, shard(s_ref.grad, rank, world), s_ref.grad)))
            top_ids, top_lp = topk_logprobs(shard(s, rank, world), 5, vocab_size=vocab, tp_group=group,
                                            temperature=temperature, chunk_size=chunk_size)
            ref_lp, ref_ids = reference_log_softmax(s, vocab, temperature).topk(5, dim=-1)
            out.append((f"topk_logprobs T={temperature} chunk={chunk_size}",
                        max(rel_err(top_lp, ref_lp, ref_lp), float((top_ids != ref_ids).any())), 0.0))
    return out


def check_logprob_collectives(rank, world, group) -> list[str]:
    s, _, _, _, vocab = make_problem(**geometries(world)["padded"])
    ids = torch.randint(0, vocab, LEAD, generator=torch.Generator().manual_seed(9))
    x = shard(s, rank, world).clone().requires_grad_()
    with RecordCollectives() as fwd:
        lp = token_logprobs(x, ids, vocab_size=vocab, tp_group=group, chunk_size=20)
    with RecordCollectives() as bwd:
        lp.sum().backward()
    with RecordCollectives() as top:
        topk_logprobs(x.detach(), 5, vocab_size=vocab, tp_group=group, chunk_size=20)
    chunks = (20, 20, 5)
    want = {"token_logprobs forward": [("all_gather_single", (world * c, 3)) for c in chunks],
            "token_logprobs backward": [],
            "topk_logprobs": [call for c in chunks for call in (("all_gather_single", (world * c, 5, 2)),
                                                                ("all_gather_single", (world * c, 2)))]}
    issued = {"token_logprobs forward": fwd.calls, "token_logprobs backward": bwd.calls,
              "topk_logprobs": top.calls}
    return [f"{name}: issued {issued[name]}, documented {want[name]}"
            for name in want if issued[name] != want[name]]


def run_checks(with_megatron: bool = True) -> dict:
    """Everything this file checks on sharded ranks, in one spawned job."""
    if dist.is_initialized():
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    results = {"full": sweep_full(rank, world, group), "topk": sweep_topk(rank, world, group),
               "bf16": sweep_bf16(rank, world, group), "extreme": sweep_extreme(rank, world, group),
               "logprobs": sweep_logprobs(rank, world, group)}
    if world > 1:
        results["collectives"] = check_collectives(rank, world, group) + check_logprob_collectives(
            rank, world, group)
    if with_megatron and world > 1:
        results["megatron_ce"] = check_megatron_cross_entropy(rank, world)
    return results


# ---------------------------------------------------------------- the tests (parent side)

class PerWorld(dict):
    """TP size -> every rank's results of ``checks``, run when first asked for: TP=1 in this
    process (one thread, as in the spawned ranks), larger TP on spawned gloo ranks."""

    def __init__(self, checks):
        super().__init__()
        self.checks = checks
        self.failed: dict[int, BaseException] = {}  # a world that failed fails every test asking for it at once

    def __missing__(self, world: int) -> list:
        if world in self.failed:
            raise self.failed[world]
        try:
            self[world] = self._run(world)
        except Exception as e:
            self.failed[world] = e
            raise
        return self[world]

    def _run(self, world: int) -> list:
        if world > 1:
            return run_distributed(self.checks, world)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [self.checks()]
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs() -> PerWorld:
    return PerWorld(run_checks)


# TP=4 (four spawned ranks) only in the whole suite, not in the quick tier.
TP4 = pytest.param(4, marks=pytest.mark.slow)
WORLDS = (1, 2, TP4)


def _assert_within(per_rank: list[list], value_tol: float, grad_tol: float, what: str) -> None:
    for rank, results in enumerate(per_rank):
        ev, eg, where_v, where_g = worst(results)
        assert ev <= value_tol, f"{what} rank {rank}: value rel error {ev:.2e} at {where_v}"
        assert eg <= grad_tol, f"{what} rank {rank}: gradient rel error {eg:.2e} at {where_g}"


@pytest.mark.parametrize("world", WORLDS)
def test_full_vocab_matches_float64_reference(runs, world):
    """Every kind, beta in {0, .1, .5, .9, 1}, T in {.5, 1, 2}, chunks dividing the tokens or not,
    vocab not divisible by TP, padded columns, a teacher padded wider, masked tokens."""
    _assert_within([r["full"] for r in runs[world]], FP32_TOL, FP32_TOL, f"TP={world} full")


@pytest.mark.parametrize("world", WORLDS)
def test_topk_with_tail_matches_float64_reference(runs, world):
    """Teacher / student top-k selection and teacher top-k given as ids + log-probs, k in {1, 5, V}."""
    _assert_within([r["topk"] for r in runs[world]], FP32_TOL, FP32_TOL, f"TP={world} top-k")


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_inputs(runs, world):
    """bf16 in, fp32 math: the value is as exact as for fp32; the gradient is rounded to bf16."""
    _assert_within([r["bf16"] for r in runs[world]], FP32_TOL, BF16_GRAD_TOL, f"TP={world} bf16")


@pytest.mark.parametrize("world", WORLDS)
def test_token_logprobs_and_topk_match_float64_reference(runs, world):
    """token_logprobs, sampled_token_reverse_kl (value and gradient) and topk_logprobs (ids and values)."""
    _assert_within([r["logprobs"] for r in runs[world]], FP32_TOL, FP32_TOL, f"TP={world} log-probs")


@pytest.mark.parametrize("world", WORLDS)
def test_finite_at_low_temperature_and_extreme_logits(runs, world):
    for rank, r in enumerate(runs[world]):
        assert not r["extreme"], f"TP={world} rank {rank}: non-finite for {r['extreme']}"


@pytest.mark.parametrize("world", (2, TP4))
def test_collectives_per_chunk_are_the_documented_ones(runs, world):
    for rank, r in enumerate(runs[world]):
        assert not r["collectives"], f"TP={world} rank {rank}:\n" + "\n".join(r["collectives"])


@pytest.mark.parametrize("world", (2, TP4))
def test_forward_kl_to_one_hot_teacher_is_megatron_cross_entropy(runs, world):
    for rank, r in enumerate(runs[world]):
        ev, eg = r["megatron_ce"]
        assert ev <= FP32_TOL and eg <= FP32_TOL, f"TP={world} rank {rank}: value {ev:.2e}, grad {eg:.2e}"


# ---------------------------------------------------------------- single-process properties

def _small(seed=0, tokens=5, width=11, vocab=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, width, generator=g, dtype=dtype) * 2,
            torch.randn(tokens, width + 2, generator=g, dtype=dtype) * 2, vocab)


@pytest.mark.parametrize("kind,beta", DISTINCT_KINDS)
@pytest.mark.parametrize("support", ["full", "teacher_topk", "student_topk", "given"])
def test_gradcheck_float64(kind, beta, support):
    s, t, vocab = _small()
    kw = dict(kind=kind, beta=beta, temperature=0.7, vocab_size=vocab, chunk_size=2,
              loss_mask=torch.tensor([True, False, True, True, True]))
    if support == "given":
        logq = torch.log_softmax(t[:, :vocab], -1)
        ids = logq.topk(4, dim=-1).indices
        kw.update(support="teacher_topk", teacher_topk_ids=ids, teacher_topk_logprobs=logq.gather(-1, ids))
        t = None
    elif support != "full":
        kw.update(support=support, top_k=4)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_divergence(z, t, **kw), (x,))


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_gradient_nonzero_iff_distributions_differ(kind, beta):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 40, generator=g) * 3
    for temperature in (0.05, 1.0):
        for t, differ in ((s + 1e-2 * torch.randn(6, 40, generator=g), True),
                          (torch.randn(6, 40, generator=g) * 3, True), (s.clone(), False)):
            x = s.clone().requires_grad_()
            out = vocab_parallel_divergence(x, t, kind=kind, beta=beta, temperature=temperature)
            out.sum().backward()
            if differ:  # the value may round to ~0 at T = 0.05 (nearly one-hot), the gradient must not
                assert (out > -1e-6).all() and (x.grad.abs().amax(-1) > 0).all(), (temperature, out)
            else:
                assert out.abs().max() < 1e-6 and x.grad.abs().max() < 1e-6, (temperature, out)


@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_extra_memory_is_per_chunk_not_per_token(support):
    """Peak memory of forward + backward minus the gradient is the same for 4x the tokens."""
    vocab, chunk = 3000, 16
    extra = {}
    for num_tokens in (64, 256):
        g = torch.Generator().manual_seed(0)
        s = torch.randn(num_tokens, vocab, generator=g).requires_grad_()
        t = torch.randn(num_tokens, vocab, generator=g)
        kw = dict(kind="jsd", beta=0.5, chunk_size=chunk, support=support,
                  top_k=None if support == "full" else 8)
        peak = peak_extra_bytes(lambda: vocab_parallel_divergence(s, t, **kw).sum().backward())
        extra[num_tokens] = peak - s.numel() * s.element_size()
    chunk_bytes = chunk * vocab * 4
    assert extra[64] < 8 * chunk_bytes, extra
    # Per-token state (a few scalars, or k ids and bucket gradients) may grow; nothing V-sized may.
    assert extra[256] - extra[64] < 192 * 256, extra


@pytest.mark.parametrize("kind,beta", DISTINCT_KINDS)
@pytest.mark.parametrize("support", ["full", "teacher_topk"])
def test_masked_rows_get_zero_gradient_whatever_they_hold(kind, beta, support):
    """A masked token with NaN student logits or a teacher row without mass leaks nothing."""
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(6, 30, generator=g), torch.randn(6, 30, generator=g)
    s[1] = float("nan")
    t[4] = float("-inf")
    mask = torch.tensor([True, False, True, True, False, True])
    x = s.clone().requires_grad_()
    out = vocab_parallel_divergence(x, t, kind=kind, beta=beta, loss_mask=mask, chunk_size=4, support=support,
                                    top_k=None if support == "full" else 5)
    out.sum().backward()
    assert (out[~mask] == 0).all() and out[mask].isfinite().all()
    assert (x.grad[~mask] == 0).all() and x.grad[mask].isfinite().all()


def test_teacher_topk_with_k_equal_vocab_is_full_support():
    s, t, vocab = _small(tokens=8, dtype=torch.float32)
    full = vocab_parallel_divergence(s, t, kind="jsd", beta=0.3, vocab_size=vocab)
    topk = vocab_parallel_divergence(s, t, kind="jsd", beta=0.3, vocab_size=vocab, support="teacher_topk",
                                     top_k=vocab)
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)


def test_non_contiguous_leading_dims_and_default_chunk():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 7, 30, generator=g), torch.randn(2, 7, 30, generator=g)
    x = s.clone().requires_grad_()
    out = vocab_parallel_divergence(x[:, :-1], t[:, :-1], kind="reverse_kl")
    out.sum().backward()
    ref = reference_divergence(s[:, :-1], t[:, :-1], kind="reverse_kl", beta=0.5, temperature=1.0,
                               vocab_size=30, mask=torch.ones(2, 6, dtype=torch.bool))
    assert out.shape == (2, 6) and (x.grad[:, -1] == 0).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="kl"), "kind must be one of"),
    (dict(kind="jsd", beta=1.5), "beta must be a number in"),
    (dict(kind="forward_kl", temperature=0.0), "temperature must be a positive"),
    (dict(kind="forward_kl", vocab_size=50), "vocab_size 50 exceeds the columns of student_logits"),
    (dict(kind="forward_kl", support="topk"), "support must be one of"),
    (dict(kind="forward_kl", support="teacher_topk"), "needs top_k"),
    (dict(kind="forward_kl", support="teacher_topk", top_k=20),
     r"top_k must be an integer in \[1, vocab_size=11\]"),
    (dict(kind="forward_kl", loss_mask=torch.ones(4, dtype=torch.bool)), "loss_mask shape"),
    (dict(kind="forward_kl", chunk_size=0), "chunk_size must be a positive integer"),
    (dict(kind="forward_kl", teacher_topk_ids=torch.zeros(5, 2, dtype=torch.long),
          teacher_topk_logprobs=torch.zeros(5, 2)), 'need support="teacher_topk"'),
])
def test_errors_name_the_argument(kwargs, message):
    s = torch.randn(5, 11)
    t = None if "teacher_topk_ids" in kwargs else torch.randn(5, 11)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_divergence(s, t, **kwargs)
