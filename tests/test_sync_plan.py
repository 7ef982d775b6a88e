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


# --- engine shards (engine TP != trainer TP) ------------------------------------------------------


def _engine_parts(arch, plan, engine_tp, g):
    """Random HF tensors for the plan, and every engine rank's slice of each."""
    from megatron_opd.rollout.plan import engine_slices

    full = {n: torch.randn(s, generator=g) for it in plan.items for n, s in zip(it.hf_names, it.hf_shapes)}
    parts = []
    for e in range(engine_tp):
        sls = engine_slices(plan, arch, engine_tp=engine_tp, engine_rank=e)
        parts.append({n: sl.take(full[n]) for it, ss in zip(plan.items, sls) for n, sl in zip(it.hf_names, ss)})
    return full, parts


@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}),
                                           ("llama", {"num_key_value_heads": 1})])
@pytest.mark.parametrize("engine_tp", [2, 4])
def test_engine_slices_tile_each_tensor_as_vllm_splits_it(model_type, kw, engine_tp):
    """Each engine rank's slices, put back together in rank order, are the HF tensor: q/k/v by
    heads (K/V heads replicated on E/K ranks when E > K), gate/up by rows, o/down by columns,
    norms whole, and the vocabulary in vLLM's padding (multiples of 64 split evenly, the last
    rank short)."""
    from megatron_opd.rollout.plan import VLLM_VOCAB_PADDING, engine_share_numel

    arch = arch_for(model_type, **kw)
    plan = plan_sync(arch, tp=1, pp=1, padded_vocab=padded_vocab_size(arch.vocab_size, 1), bucket_bytes=1 << 20)
    full, parts = _engine_parts(arch, plan, engine_tp, torch.Generator().manual_seed(1))
    k = arch.num_kv_heads
    for it in plan.items:
        for j, name in enumerate(it.hf_names):
            pieces = [p[name] for p in parts]
            if it.layout == "replicated":
                assert all(torch.equal(x, full[name]) for x in pieces)
            elif it.layout == "row":
                assert torch.equal(torch.cat(pieces, dim=1), full[name]), name
            elif it.layout == "qkv" and j > 0 and engine_tp > k:
                reps = engine_tp // k
                assert all(torch.equal(pieces[e], pieces[e - e % reps]) for e in range(engine_tp)), name
                assert torch.equal(torch.cat(pieces[::reps]), full[name]), name
            else:
                assert torch.equal(torch.cat(pieces), full[name]), name
            if it.layout == "vocab":
                per = -(-arch.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING // engine_tp
                assert [p[name].shape[0] for p in parts[:-1]] == [per] * (engine_tp - 1)
    total = sum(math.prod(s) for it in plan.items for s in it.hf_shapes) + sum(
        math.prod(it.hf_shapes[0]) for it in plan.items if it.aliases)
    shares = [engine_share_numel(plan, arch, engine_tp=engine_tp, engine_rank=e) for e in range(engine_tp)]
    assert max(shares) < total / engine_tp * 1.2 and sum(shares) >= total


def test_vocab_slices_follow_vllm_not_megatron_padding():
    """V=300 over 2 engine ranks: vLLM pads to 320 and splits 160 / 140; megatron (TP2) pads to 512."""
    from megatron_opd.rollout.plan import engine_slice

    arch = arch_for("llama")
    assert arch.vocab_size == 300 and padded_vocab_size(300, 2) != 320
    got = [engine_slice(arch, "vocab", 0, (300, 96), engine_tp=2, engine_rank=e) for e in range(2)]
    assert [(s.dim, s.start, s.size) for s in got] == [(0, 0, 160), (0, 160, 140)]


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_local_regroup_of_own_shard_is_the_engine_share(model_type, tied):
    """Engine TP = trainer TP on one stage: each rank's own megatron shard, regrouped alone, is
    exactly its engine rank's share of every non-vocabulary tensor (the executor's no-collective
    path); the vocabulary rows differ (megatron's padding) and are gathered instead."""
    from megatron_opd.rollout.plan import engine_slices, local_engine_shares

    arch = arch_for(model_type, tie_word_embeddings=tied)
    tp = 2
    padded = padded_vocab_size(arch.vocab_size, tp)
    plan = plan_sync(arch, tp=tp, pp=1, padded_vocab=padded, bucket_bytes=64 << 10)
    assert local_engine_shares(plan, engine_tp=tp)
    assert local_engine_shares(plan_sync(arch, tp=1, pp=1, padded_vocab=padded, bucket_bytes=1 << 20), engine_tp=2)
    assert not local_engine_shares(plan_sync(arch, tp=2, pp=1, padded_vocab=padded, bucket_bytes=1 << 20), engine_tp=4)
    assert not local_engine_shares(plan_sync(arch, tp=2, pp=2, padded_vocab=padded, bucket_bytes=1 << 20), engine_tp=2)
    g = torch.Generator().manual_seed(2)
    for rank in range(tp):
        sls = engine_slices(plan, arch, engine_tp=tp, engine_rank=rank)
        for it, ss in zip(plan.items, sls):
            if it.layout == "vocab":
                continue
            src = DictSource({n: torch.randn(s, generator=g) for n, s in zip(it.hf_names, it.hf_shapes)})
            own = shard_from_hf(it.row, it.hf_names, src, arch, tp_rank=rank, tp_size=tp, padded_vocab=padded)
            regrouped = hf_from_shards(it.row, it.hf_names, [own], arch)
            for n, sl in zip(it.hf_names, ss):
                assert torch.equal(regrouped[n], sl.take(src.tensors[n])), (rank, n)


def test_engine_tp_the_engine_cannot_split_is_refused():
    from megatron_opd.rollout.plan import check_engine_tp

    arch = arch_for("llama")  # 4 query heads, 2 KV heads, FFN 160
    check_engine_tp(arch, 4)  # K/V heads replicated
    with pytest.raises(ValueError, match=r"rollout.tp=3: the engine cannot split num_attention_heads=4"):
        check_engine_tp(arch, 3)
    with pytest.raises(ValueError, match=r"rollout.tp=8: the engine cannot split num_attention_heads=4"):
        check_engine_tp(arch, 8)


def test_vocab_rows_are_local_when_both_paddings_split_alike():
    from megatron_opd.rollout.plan import vocab_rows_local

    for vocab, tp, local in [(32000, 2, True), (152064, 2, True), (151936, 2, False), (512, 2, True), (300, 2, False), (14, 2, True)]:
        arch = arch_for("llama", vocab_size=vocab)
        assert vocab_rows_local(arch, tp=tp, padded_vocab=padded_vocab_size(vocab, tp)) == local, vocab


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
