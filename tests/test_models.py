"""Megatron models built from HF checkpoints match transformers, at every TP/PP layout, and train
identically across layouts."""

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing.checks import logits_vs_transformers
from megatron_opd.testing.multiprocess import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.slow
def test_logits_match_transformers_every_family_and_layout(tiny_models):
    results = run_distributed(logits_vs_transformers, 4, tiny_models, LAYOUTS, timeout=600)
    diffs = {}
    for r in results:
        diffs.update(r)
    assert len(diffs) == len(tiny_models) * len(LAYOUTS)
    bad = {k: v for k, v in diffs.items() if not v <= 1e-4}
    assert not bad, f"max |logit diff| above 1e-4: {bad}"


def _hf_tensors(model, *, grads: bool = False) -> dict:
    """The whole model (or its gradients, megatron DDP's ``main_grad``) as HF-named copies, on
    every rank, through the resharding executor; a tied model's lm_head copy left out."""
    from megatron_opd.rollout.sync import WeightSync

    params = list(model.module.parameters())
    saved = [p.data for p in params]
    if grads:
        for p in params:
            p.data = p.main_grad
    try:
        names = model.hf_names()
        return {n: t.clone() for n, t in WeightSync(model, bucket_bytes=1 << 20).iter_hf_tensors() if n in names}
    finally:
        for p, data in zip(params, saved):
            p.data = data


def _train_step(model_dir: str, layouts: list, global_batch: int, num_micro: int) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.losses import token_logprobs
    from megatron_opd.config import OptimConfig
    from megatron_opd.train.optim import forward_backward, optimizer_step

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (global_batch, 11), generator=g)
    mask = (torch.rand(global_batch, 10, generator=g) > 0.2).float()
    results = {}
    for tp, pp in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp))
        model = load_model(model_dir, mp)
        # A large Adam eps keeps the first update a smooth function of the gradient (with eps=1e-8
        # it is lr * sign(g), which flips on round-off for near-zero gradients).
        t = OptimConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.1, adam_eps=1e-3).build(model, total_steps=1)
        rows = torch.arange(global_batch)[mp.dp_rank:: mp.dp_size]
        micro = [{"input_ids": ids[r], "position_ids": torch.arange(11).expand(len(r), -1),
                  "loss_mask": mask[r]} for r in rows.chunk(num_micro)]

        def output_fn(logits, batch):
            lp = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:],
                                vocab_size=model.arch.vocab_size, tp_group=mp.tp_group)
            loss = -(lp * batch["loss_mask"]).sum()
            n = batch["loss_mask"].sum().to(torch.int)
            return loss, n, {"loss_sum": loss.detach().clone(), "tokens": n.clone()}

        out = forward_backward(t, micro, output_fn)
        loss = torch.zeros(2)
        if mp.is_last_stage:
            loss = torch.stack([sum(o["loss_sum"] for o in out), sum(o["tokens"] for o in out).float()])
        dist.all_reduce(loss)  # every replica's last-stage TP ranks hold the same sums
        loss = (loss[0] / loss[1]).item()
        grads = _hf_tensors(model, grads=True)
        applied, grad_norm = optimizer_step(t)
        params = _hf_tensors(model)
        if dist.get_rank() == 0:
            results[(tp, pp)] = {"loss": loss, "grad_norm": grad_norm, "grads": grads,
                                 "params": params, "applied": applied}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama", "qwen2_tied", "qwen3"])  # qwen3: q/k norms shared across TP ranks
def test_training_step_identical_across_layouts(tiny_models, variant):
    results = run_distributed(_train_step, 4, tiny_models[variant], LAYOUTS, 8, 2, timeout=600)[0]
    base = results[(1, 1)]
    assert base["applied"] and base["grad_norm"] > 0
    for layout, r in results.items():
        assert r["applied"], layout
        assert abs(r["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"]), (layout, r["loss"], base["loss"])
        assert abs(r["grad_norm"] - base["grad_norm"]) <= 1e-5 * base["grad_norm"], layout
        true_norm = sum(float((g.double() ** 2).sum()) for g in r["grads"].values()) ** 0.5
        assert abs(r["grad_norm"] - true_norm) <= 1e-5 * true_norm, (layout, r["grad_norm"], true_norm)
        assert r["grads"].keys() == base["grads"].keys()
        for name, g in base["grads"].items():
            err = (r["grads"][name] - g).abs().max().item()
            assert err <= 1e-5 * max(g.abs().max().item(), 1e-3), (layout, name, err)
        for name, p in base["params"].items():
            err = (r["params"][name] - p).abs().max().item()
            assert err <= 1e-5, (layout, name, err)


def _packed_vs_alone(model_dir: str) -> dict:
    """Logits of the trainer's packed THD row of three sequences (also padded to a multiple of 8)
    against each sequence alone."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.schedule import run_schedule
    from megatron_opd.train.data import Sequence, micro_batch

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    model = load_model(model_dir, mp)
    model.module.eval()
    g = torch.Generator().manual_seed(7)
    seqs = [Sequence(0, 0, torch.randint(0, 300, (n,), generator=g).tolist(), 1, [1] * (n - 1)) for n in (5, 9, 7)]
    packed = micro_batch(seqs, [0, 1, 2], device="cpu")
    padded = micro_batch(seqs, [0, 1, 2], device="cpu", multiple_of=8)
    logits = lambda mbs: run_schedule(model, mbs, lambda out, mb: out.detach().clone(), forward_only=True)
    with torch.no_grad():
        row, padded_row = (x[0] for x in logits([packed, padded]))
        parts = torch.cat([logits([micro_batch(seqs, [i], device="cpu")])[0][0] for i in range(3)])
    return {"positions": packed["position_ids"].tolist(), "padded_positions": padded["position_ids"].tolist(),
            "cu_seqlens": packed["packed_seq_params"].cu_seqlens_q.tolist(),
            "padded_cu_seqlens": padded["packed_seq_params"].cu_seqlens_q.tolist(),
            "padded_shape": tuple(padded_row.shape), "logit_diff": (row - parts).abs().max().item(),
            "padded_logit_diff": (padded_row[:21] - parts).abs().max().item()}


def _hidden_states_round_trip(model_dir: str, tp: int) -> float:
    """Logits minus (final hidden states @ output weight), through the pipeline runner."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.schedule import final_hidden_states, output_weight, run_schedule

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, 1), what="student")
    model = load_model(model_dir, mp, seed=1)
    ids = torch.randint(0, model.arch.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    mb = {"input_ids": ids, "position_ids": torch.arange(11).view(1, 11)}
    logits = run_schedule(model, [mb], lambda z, b: z.clone(), forward_only=True)[0]
    with final_hidden_states(model):
        hidden = run_schedule(model, [mb], lambda z, b: z.clone(), forward_only=True)[0]
    after = run_schedule(model, [mb], lambda z, b: z.clone(), forward_only=True)[0]
    assert hidden.shape == (1, 11, model.config.hidden_size) and torch.equal(after, logits)
    return (logits - hidden @ output_weight(model).t()).abs().max().item()


def _schedule_checks(packed_model: str, tied_model: str) -> dict:
    return {"packed": _packed_vs_alone(packed_model), "hidden_err": _hidden_states_round_trip(tied_model, 2)}


@pytest.fixture(scope="module")
def schedule_checks(tiny_models) -> list[dict]:
    """The schedule runner's checks, in one world of 2 ranks (each rank its own TP1 replica, then TP2)."""
    return run_distributed(_schedule_checks, 2, tiny_models["llama"], tiny_models["qwen2_tied"], timeout=300)


def test_packed_thd_rows_start_each_sequence_at_position_zero(schedule_checks):
    for r in (c["packed"] for c in schedule_checks):
        assert r["positions"] == [list(range(5)) + list(range(9)) + list(range(7))]
        assert r["cu_seqlens"] == [0, 5, 14, 21]
        # padded to 24 tokens by a 3-token sequence of its own, which no real token sees
        assert r["padded_cu_seqlens"] == [0, 5, 14, 21, 24] and r["padded_shape"][0] == 24
        assert r["padded_positions"] == [r["positions"][0] + [0, 1, 2]]
        assert r["logit_diff"] <= 1e-5 and r["padded_logit_diff"] <= 1e-5, r


def test_final_hidden_states_times_output_weight_are_the_logits(schedule_checks):
    """The bypass returns the output layer's input (after the final norm) and is undone after
    (TP2, tied embeddings: the output weight is the word embeddings' shard)."""
    errs = [c["hidden_err"] for c in schedule_checks]
    assert max(errs) < 1e-5, errs
