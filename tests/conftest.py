"""Shared fixtures: tiny HF models and tokenizers built once per session, in a temp directory."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """HF model directories keyed by variant name, each a different family/tying combination."""
    from megatron_opd.testing.tiny import make_hf_model

    root = tmp_path_factory.mktemp("tiny_models")
    variants = {
        "llama": dict(model_type="llama"),
        "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
        "qwen2": dict(model_type="qwen2"),
        "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True),
        "qwen3": dict(model_type="qwen3"),
        "mistral": dict(model_type="mistral", sliding_window=6),
    }
    return {name: str(make_hf_model(root / name, seed=i, **kw))
            for i, (name, kw) in enumerate(variants.items())}


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory):
    """Mixture-of-experts HF model directories: Qwen3-MoE (8 experts, top-2, renormalised top-k),
    the same without renormalisation, Mixtral (4 experts, top-2)."""
    from megatron_opd.testing.tiny import make_hf_model

    root = tmp_path_factory.mktemp("tiny_moe_models")
    variants = {
        "qwen3_moe": dict(model_type="qwen3_moe"),
        "qwen3_moe_unnormalized": dict(model_type="qwen3_moe", norm_topk_prob=False),
        "mixtral": dict(model_type="mixtral"),
    }
    return {name: str(make_hf_model(root / name, seed=10 + i, **kw))
            for i, (name, kw) in enumerate(variants.items())}
