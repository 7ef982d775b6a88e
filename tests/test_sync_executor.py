"""The resharding executor on 2 gloo ranks, without an engine: at TP2 and at PP2 every rank of the
replica gets exactly the HF checkpoint's tensors (bit for bit, a tied lm_head as a copy of the
embedding), bucket by bucket; and a step's metrics are reduced over the world by name."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.testing.multiprocess import run_distributed


def _streamed(model_dir: str, layouts: list) -> dict:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.rollout.sync import WeightSync

    out = {}
    for tp, pp in layouts:
        mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(tp, pp))
        sync = WeightSync(load_model(model_dir, mp), bucket_bytes=20_000)
        out[(tp, pp)] = ({n: t.clone() for n, t in sync.iter_hf_tensors()}, len(sync.plan.buckets))
    return out


def _checks(model_dir: str) -> dict:
    return {"streamed": _streamed(model_dir, [(2, 1), (1, 2)]), "metrics": _reduced_metrics()}


@pytest.fixture(scope="module")
def per_rank(tiny_models) -> list[dict]:
    """Both checks in one world of 2 ranks."""
    return run_distributed(_checks, 2, tiny_models["qwen2_tied"], timeout=300)


def test_every_rank_gets_exactly_the_checkpoint(per_rank, tiny_models):
    reference = load_file(str(Path(tiny_models["qwen2_tied"]) / "model.safetensors"))
    for rank, per_layout in enumerate(r["streamed"] for r in per_rank):
        for layout, (tensors, num_buckets) in per_layout.items():
            assert num_buckets > 3, layout
            assert tensors.keys() == set(reference) | {"lm_head.weight"}, (rank, layout)
            for name, ref in reference.items():
                assert torch.equal(tensors[name], ref), (rank, layout, name)
            assert torch.equal(tensors["lm_head.weight"], reference["model.embed_tokens.weight"])


def _reduced_metrics() -> dict:
    import torch.distributed as dist

    from megatron_opd import parallel
    from megatron_opd.train.data import Sequence
    from megatron_opd.train.metrics import step_metrics

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))  # 2 replicas
    r = dist.get_rank()
    outputs = [{"loss_sum": torch.tensor(2.0 + r), "divergence_sum": torch.tensor(1.0), "loss_tokens": torch.tensor(4.0),
                "mismatch_max": torch.tensor(0.1 * (r + 1)), "mismatch_sum": torch.tensor(0.2),
                "mismatch_tokens": torch.tensor(4.0)}] * 2
    # replica r: r + 1 sequences of 3 prompt + 4 completion tokens, one of them a tool token
    seqs = [Sequence(0, 0, [1] * 7, 3, [1, 1, 0, 1], [0.0] * 4)] * (r + 1)
    return step_metrics(outputs, seqs, mp)


def test_step_metrics_are_summed_by_name_over_the_world(per_rank):
    m = [r["metrics"] for r in per_rank]
    assert m[0] == m[1]
    m = m[0]
    assert math.isclose(m["loss"], (2 * 2 + 2 * 3) / 16) and math.isclose(m["divergence"], 4 / 16)
    assert m["loss_tokens"] == 16 and m["_tokens"] == 3 * 7
    assert math.isclose(m["response_length"], 4) and math.isclose(m["masked_tool_fraction"], 3 / 12)
    assert math.isclose(m["rollout/logprob_abs_diff_max"], 0.2, rel_tol=1e-6)
    assert math.isclose(m["rollout/logprob_abs_diff_mean"], 0.8 / 16, rel_tol=1e-6)
    assert "topk_overlap" not in m  # no micro-batch measured it
