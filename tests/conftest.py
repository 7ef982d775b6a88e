"""Shared fixtures: tiny HF models and tokenizers and the tiny OPD task, built once per session in
a temp directory; one intra-op thread for tests of tiny tensors."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """A test that starts vLLM is slow: the quick tier (-m "not slow") leaves it out."""
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """The tiny OPD task (arithmetic data, random student and teacher) of the trainer tests."""
    from megatron_opd.testing.tiny_task import make_task_dir

    return make_task_dir(tmp_path_factory.mktemp("task"))


@pytest.fixture
def one_thread():
    """One intra-op thread: for tiny tensors, since OpenMP regions stall for milliseconds whenever
    the machine's cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
