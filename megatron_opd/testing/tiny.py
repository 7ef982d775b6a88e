"""Tiny random HF models and tokenizers built locally (nothing is downloaded), for tests and demos."""

from __future__ import annotations

from pathlib import Path

import torch

# Non-square on purpose: hidden != num_heads * head_dim != ffn, GQA, vocab not a multiple of 128.
BASE = dict(
    vocab_size=300,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_EXTRAS = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    # vLLM's Qwen2 derives head_dim from hidden_size / heads (it ignores config.head_dim).
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_size=128),
    "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    sliding_window=None),
    # Mixtures of experts, top-2: expert ffn != hidden != dense ffn.
    "qwen3_moe": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True),
    "mixtral": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None),
}


def hf_config(model_type: str, **overrides):
    """A transformers config object for a tiny model of ``model_type``."""
    from transformers import AutoConfig

    kwargs = dict(BASE)
    kwargs.update(FAMILY_EXTRAS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_hf_model(out_dir: str | Path, model_type: str, *, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str | None = None, **overrides) -> Path:
    """Save a randomly initialised tiny HF causal LM of ``model_type`` to ``out_dir``.

    Weights are drawn with a larger std than transformers' default so that logits differ
    meaningfully between tokens (a near-uniform model would hide layout bugs).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = hf_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / p.shape[-1] ** 0.5))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def make_sentencepiece_tokenizer(out_dir: str | Path, *, vocab_size: int = 300,
                                 corpus: list[str] | None = None) -> Path:
    """Train a tiny SentencePiece model offline and save it as an HF Llama tokenizer in ``out_dir``."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        words = ["the", "student", "teacher", "learns", "from", "samples", "policy", "token",
                 "distill", "model", "numbers", "add", "sum", "carry", "digit", "answer"]
        g = torch.Generator().manual_seed(0)
        corpus = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g))
                  + f" {int(torch.randint(0, 10**6, (1,), generator=g))}" for _ in range(400)]
    text_file = out_dir / "corpus.txt"
    text_file.write_text("\n".join(corpus) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    text_file.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir
