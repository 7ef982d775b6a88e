"""Tiny tokenizers of different kinds trained here (nothing is downloaded), for cross-tokenizer tests:
SentencePiece BPE with byte fallback, byte-level BPE, with or without a BOS."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "student", "teacher", "learns", "from", "samples", "policy", "token", "distill", "model",
         "numbers", "add", "sum", "carry", "digit", "answer", "café", "naïve", "über"]


def corpus(num_lines: int = 400, *, seed: int = 0) -> list[str]:
    """Lines of the words above and numbers, for training the tokenizers."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) + f" {rng.randrange(10**6)}" for _ in range(num_lines)]


def make_sentencepiece_bpe(out_dir: str | Path, *, vocab_size: int, add_bos: bool = True, seed: int = 0):
    """A Llama-style SentencePiece BPE tokenizer (byte fallback, BOS ``<s>`` added when ``add_bos``,
    EOS ``</s>``), loaded through transformers."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(corpus(seed=seed)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tok = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=add_bos)
    tok.save_pretrained(str(out_dir))
    return tok


def make_byte_level_bpe(out_dir: str | Path, *, vocab_size: int, eos: str = "<|endoftext|>",
                        bos: str | None = None, extra_special: tuple[str, ...] = (), seed: int = 1):
    """A GPT-2-style byte-level BPE tokenizer with EOS ``eos`` and, if given, a BOS it adds to every
    text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [eos] + ([bos] if bos else []) + list(extra_special)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed=seed), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                   additional_special_tokens=list(extra_special) or None)
    fast.save_pretrained(str(out_dir))
    return fast
