"""A synthetic task on which distillation visibly works on a CPU in minutes: three-digit addition
with the answer written least-significant digit first, zero-padded to 4 digits, then <eos>.

    969+999=  ->  8691<eos>

14 tokens, every sequence 8 prompt + 5 answer tokens; 10 % of the (a, b) pairs are held out by
hash. The metric is exact match of the greedy answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

PAD, EOS = "<pad>", "<eos>"
VOCAB = [PAD, EOS] + [str(d) for d in range(10)] + ["+", "="]
EOS_ID = VOCAB.index(EOS)
PAD_ID = VOCAB.index(PAD)


def answer(a: int, b: int) -> str:
    return f"{a + b:04d}"[::-1]


def prompt(a: int, b: int) -> str:
    return f"{a:03d}+{b:03d}="


def held_out(a: int, b: int) -> bool:
    return hashlib.sha256(f"{a},{b}".encode()).digest()[0] < 26  # ~10 %


def pairs(split: str) -> list[tuple[int, int]]:
    return [(a, b) for a in range(1000) for b in range(1000) if held_out(a, b) == (split == "eval")]


def make_tokenizer(out_dir: str | Path):
    """A character-level HF tokenizer (``tokenizers`` WordLevel) saved into ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("<eos>|<pad>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return fast


def write_datasets(out_dir: str | Path, *, num_eval: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl (all training pairs, with reference completions) and eval.jsonl."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = pairs("train")
    rng.shuffle(train)
    ev = pairs("eval")
    rng.shuffle(ev)
    paths = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", ev[:num_eval])):
        p = out_dir / name
        with p.open("w") as f:
            for a, b in rows:
                f.write(json.dumps({"prompt": prompt(a, b), "completion": answer(a, b),
                                    "answer": answer(a, b)}) + "\n")
        paths.append(p)
    return paths[0], paths[1]


def encode(text: str) -> list[int]:
    """Token ids without a tokenizer object (one id per character)."""
    return [VOCAB.index(ch) for ch in text]


def llama_config(*, hidden: int, heads: int, layers: int) -> dict:
    """A Llama-style config (RMSNorm, SwiGLU with ffn = 4 x hidden, RoPE, no biases, head_dim 32)."""
    return dict(model_type="llama", vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                head_dim=hidden // heads, max_position_embeddings=32, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
