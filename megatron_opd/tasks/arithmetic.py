"""A synthetic task on which distillation visibly works on a CPU in minutes: three-digit addition
with the answer written least-significant digit first, zero-padded to 4 digits, then <eos>.

    969+999=  ->  8691<eos>

14 tokens, every sequence 8 prompt + 5 answer tokens; 10 % of the (a, b) pairs are held out by
hash. The metric is exact match of the greedy answer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PAD, EOS = "<pad>", "<eos>"
VOCAB = [PAD, EOS] + [str(d) for d in range(10)] + ["+", "="]
EOS_ID = VOCAB.index(EOS)
PAD_ID = VOCAB.index(PAD)
DIGIT0 = VOCAB.index("0")
PLUS_ID, EQ_ID = VOCAB.index("+"), VOCAB.index("=")


def answer(a: int, b: int) -> str:
    return f"{a + b:04d}"[::-1]


def prompt(a: int, b: int) -> str:
    return f"{a:03d}+{b:03d}="


def held_out(a: int, b: int) -> bool:
    return hashlib.sha256(f"{a},{b}".encode()).digest()[0] < 26  # ~10 %


@functools.lru_cache(maxsize=1)
def _held_out_table() -> torch.Tensor:
    return torch.tensor([[held_out(a, b) for b in range(1000)] for a in range(1000)])


def pairs(split: str) -> list[tuple[int, int]]:
    """All (a, b) of the split, in order."""
    a, b = torch.nonzero(_held_out_table() == (split == "eval"), as_tuple=True)
    return list(zip(a.tolist(), b.tolist()))


def shuffled_pairs(split: str, *, seed: int = 0) -> list[tuple[int, int]]:
    """All (a, b) of the split in a fixed random order: the order of the written datasets, so
    that the first ``n`` of ``"eval"`` are the prompts of eval.jsonl."""
    rows = pairs(split)
    random.Random(f"{split}-{seed}").shuffle(rows)
    return rows


def encode_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, 13]`` token ids of ``a+b=`` followed by the reversed 4-digit sum and <eos>."""
    digit = lambda x, p: DIGIT0 + (x // p) % 10  # noqa: E731
    s = a + b
    cols = [digit(a, 100), digit(a, 10), digit(a, 1), torch.full_like(a, PLUS_ID),
            digit(b, 100), digit(b, 10), digit(b, 1), torch.full_like(a, EQ_ID),
            digit(s, 1), digit(s, 10), digit(s, 100), digit(s, 1000), torch.full_like(a, EOS_ID)]
    return torch.stack(cols, dim=1)


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


def write_datasets(out_dir: str | Path, *, num_train: int | None = None, num_eval: int = 1000,
                   seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl (training pairs with reference completions; all of them unless ``num_train``)
    and eval.jsonl (``num_eval`` held-out pairs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, ev = shuffled_pairs("train", seed=seed), shuffled_pairs("eval", seed=seed)
    paths = []
    for name, rows in (("train.jsonl", train[:num_train]), ("eval.jsonl", ev[:num_eval])):
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


def llama_config(*, hidden: int, heads: int, layers: int, vocab_size: int = len(VOCAB), eos_id: int = EOS_ID
                 ) -> dict:
    """A Llama-style config (RMSNorm, SwiGLU with ffn = 4 x hidden, RoPE, no biases, head_dim 32)."""
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                head_dim=hidden // heads, max_position_embeddings=32, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=PAD_ID,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


PAIR_EOS = "</s>"
PAIR_VOCAB = [PAD, PAIR_EOS, "+", "="] + [f"{a}{b}" for a in range(10) for b in range(10)] + [str(d) for d in range(10)]
PAIR_EOS_ID = PAIR_VOCAB.index(PAIR_EOS)
PAIR0, PAIR_DIGIT0 = PAIR_VOCAB.index("00"), PAIR_VOCAB.index("0")


def make_pair_tokenizer(out_dir: str | Path):
    """Another tokenizer for the same task, for cross-tokenizer distillation: digit pairs are one
    token (read left to right), EOS is ``</s>``, and the ids are not the character-level ones."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(PAIR_VOCAB)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"</s>|<pad>|\d\d|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=PAIR_EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return fast


def encode_pairs_paired(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, 9]`` the ids of :func:`make_pair_tokenizer` for what :func:`encode_pairs` spells:
    ``96 9 + 99 9 =`` then the reversed sum in two digit pairs and ``</s>``."""
    s = a + b
    digit = lambda x, p: (x // p) % 10  # noqa: E731
    first, last = lambda x: PAIR0 + x // 10, lambda x: PAIR_DIGIT0 + x % 10  # noqa: E731
    cols = [first(a), last(a), torch.full_like(a, PAIR_VOCAB.index("+")), first(b), last(b),
            torch.full_like(a, PAIR_VOCAB.index("=")),
            PAIR0 + 10 * digit(s, 1) + digit(s, 10), PAIR0 + 10 * digit(s, 100) + digit(s, 1000),
            torch.full_like(a, PAIR_EOS_ID)]
    return torch.stack(cols, dim=1)


@dataclass(frozen=True)
class Encoding:
    """One way to write the task as token ids: a tokenizer, its ids of ``a+b=answer<eos>`` and where the
    answer starts (the warm starts train and score a model in either)."""

    name: str
    vocab_size: int
    prompt_len: int
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_tokenizer: Callable[[str | Path], object]
    eos_id: int


ENCODINGS = {
    "chars": Encoding("chars", len(VOCAB), 8, encode_pairs, make_tokenizer, EOS_ID),
    "pairs": Encoding("pairs", len(PAIR_VOCAB), 6, encode_pairs_paired, make_pair_tokenizer, PAIR_EOS_ID),
}
