"""The resharding planner, checked without processes: coverage of every HF tensor, shard shapes,
regrouping against the converter's transforms, buckets."""

import math

import pytest
import torch

from megatron_opd.models import ArchConfig, padded_vocab_size
from megatron_opd.models.layout import DictSource, hf_from_shards, shard_from_hf
from megatron_opd.rollout.plan import plan_sync
from megatron_opd.testing.tiny import hf_config


def arch_for(model_type, **kw):
    return ArchConfig.from_hf_config(hf_config(model_type, **kw).to_dict())


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_plan_covers_every_hf_tensor_once_and_regroups_exactly(model_type, tied, tp, pp):
    arch = arch_for(model_type, tie_word_embeddings=tied)
    padded = padded_vocab_size(arch.vocab_size, tp)
    plan = plan_sync(arch, tp=tp, pp=pp, padded_vocab=padded, bucket_bytes=64 << 10)
    names = plan.hf_names()
    expected = {f"model.layers.{i}.{n}" for i in range(arch.num_layers)
                for p in arch.family.layer_params for n in p.hf}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert sorted(names) == sorted(expected)  # each exactly once; tied lm_head as an alias
    # Layers live on the stage megatron gives them, with stage-local names.
    for it in plan.items:
        if it.mcore_name.startswith("decoder.layers."):
            local = int(it.mcore_name.split(".")[2])
            layer = int(it.hf_names[0].split(".")[2])
            assert layer == it.stage * (arch.num_layers // pp) + local
    # Regrouping the planned shard slices reproduces the HF tensors (random data, every layout).
    g = torch.Generator().manual_seed(0)
    for it in plan.items:
        src = DictSource({n: torch.randn(s, generator=g) for n, s in zip(it.hf_names, it.hf_shapes)})
        shards = [shard_from_hf(it.row, it.hf_names, src, arch, tp_rank=r, tp_size=tp, padded_vocab=padded)
                  for r in range(tp)]
        assert all(tuple(s.shape) == it.shard_shape for s in shards), it
        if it.shard_dim is None:
            shards = shards[:1]
        back = hf_from_shards(it.row, it.hf_names, shards, arch)
        for n in it.hf_names:
            assert torch.equal(back[n], src.tensors[n]), (it.mcore_name, n)


def test_buckets_respect_size_and_stages():
    arch = arch_for("llama")
    plan = plan_sync(arch, tp=2, pp=2, padded_vocab=512, bucket_bytes=100_000)
    seen = []
    for b in plan.buckets:
        stages = {plan.items[i].stage for i in b.items}
        assert stages == {b.stage}
        assert b.hf_numel * 4 <= 100_000 or len(b.items) == 1
        seen.extend(b.items)
    assert seen == list(range(len(plan.items)))
    assert "qkv" in plan.describe() and "lm_head.weight" in plan.describe()


def test_bad_bucket_size_is_refused():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan_sync(arch_for("llama"), tp=1, pp=1, padded_vocab=384, bucket_bytes=0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("tp,pp,ep,etp", [(1, 1, 1, 1), (1, 1, 2, 1), (2, 1, 2, 2), (1, 2, 2, 1), (2, 2, 4, 1)])
def test_expert_plan_covers_every_expert_once_and_regroups_exactly(model_type, tp, pp, ep, etp):
    from megatron_opd.models.layout import model_hf_shapes

    arch = arch_for(model_type)
    padded = padded_vocab_size(arch.vocab_size, tp)
    plan = plan_sync(arch, tp=tp, pp=pp, ep=ep, etp=etp, padded_vocab=padded, bucket_bytes=64 << 10)
    assert sorted(plan.hf_names()) == sorted(model_hf_shapes(arch))  # every expert of every EP rank, once
    num_local = arch.num_experts // ep
    experts = [it for it in plan.items if it.is_expert]
    assert len(experts) == arch.num_layers * num_local * 2 and all(it.ep_copies == ep for it in experts)
    for b in plan.buckets:  # expert buckets hold only experts, of one stage
        assert {plan.items[i].is_expert for i in b.items} == {b.expert}
        assert [n for n, _ in plan.bucket_tensors(b)] and sum(
            math.prod(s) for _, s in plan.bucket_tensors(b)) == b.hf_numel
    g = torch.Generator().manual_seed(0)
    for it in experts:
        local = int(it.mcore_name.split(".")[6])  # decoder.layers.L.mlp.experts.local_experts.J...
        layer = int(it.hf_names[0].split(".")[2])
        assert layer == it.stage * (arch.num_layers // pp) + int(it.mcore_name.split(".")[2])
        for copy in range(ep):  # EP rank `copy` holds global expert copy * num_local + local
            names = it.copy_names(copy)
            assert all(f".experts.{copy * num_local + local}." in n for n in names), names
            src = DictSource({n: torch.randn(s, generator=g) for n, s in zip(names, it.copy_shapes())})
            shards = [shard_from_hf(it.row_for(copy), names, src, arch, tp_rank=r, tp_size=etp, padded_vocab=padded)
                      for r in range(etp)]
            assert all(tuple(s.shape) == it.shard_shape for s in shards), it
            back = hf_from_shards(it.row_for(copy), names, shards, arch)
            assert all(torch.equal(back[n], src.tensors[n]) for n in names)
    # What one rank receives at TP1 x PP1: the experts of the other EP ranks, nothing else.
    if tp == pp == etp == 1:
        expert_numel = sum(math.prod(s) for n, s in model_hf_shapes(arch).items() if ".experts." in n)
        assert plan.received_bytes(0, element_size=4) == 4 * expert_numel * (ep - 1) // ep
