"""Cross-tokenizer alignment on real tokenizer pairs trained here: SentencePiece BPE (byte fallback,
BOS) and byte-level BPE of different sizes and merges, the demo task's character-level tokenizer
and one that merges digit pairs. Spans are checked against boundaries found independently, by
decoding prefixes with each tokenizer's own decoder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from megatron_opd.tasks.arithmetic import make_pair_tokenizer, make_tokenizer
from megatron_opd.testing.tiny_tokenizers import make_byte_level_bpe, make_sentencepiece_bpe
from megatron_opd.train.alignment import AlignmentError, TokenizerPair, pack_alignments

TEXTS = [" from the teacher learns 12345 answer", " café naïve über 907 sum", " the student 4 distill"]
DIGITS = ["1234", "9750", "08", "5"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP regions stall when the machine's cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_tokenizers")
    return {
        "sp": make_sentencepiece_bpe(root / "sp", vocab_size=350, add_bos=True),
        "sp_big": make_sentencepiece_bpe(root / "sp_big", vocab_size=420, add_bos=False, seed=3),
        "bpe": make_byte_level_bpe(root / "bpe", vocab_size=420, bos="<|begin|>"),
        "bpe_small": make_byte_level_bpe(root / "bpe_small", vocab_size=300, extra_special=("<tool>",), seed=2),
        "char": make_tokenizer(root / "char"),
        "pair": make_pair_tokenizer(root / "pair"),
    }


PAIRS = [("sp", "bpe"), ("bpe", "sp_big"), ("bpe_small", "sp"), ("sp", "sp_big"), ("char", "pair")]


def student_ids(pair: TokenizerPair, text: str, *, split: int = 0) -> list[int]:
    """The student's tokens of ``text``: its own tokenization, with every ``split``-th word spelled
    one character per token (a non-canonical tokenization, as sampling gives)."""
    cont = pair.student.continuation
    out = []
    for k, word in enumerate(re.findall(r" ?[^ ]+", text)):
        if split and k % split == 0:
            out += [i for ch in word for i in cont.encode(ch, add_special_tokens=False).ids]
        else:
            out += cont.encode(word, add_special_tokens=False).ids
    return out


def cases(pair: TokenizerPair, s_name: str):
    """(prompt ids, completion ids) for a tokenizer pair."""
    tok = pair.student.tokenizer
    eos = [tok.eos_token_id]
    if s_name == "char":
        return [(tok(f"{a}+{b}=")["input_ids"], student_ids(pair, d, split=k % 2) + eos)
                for k, (a, b, d) in enumerate([(123, 456, "9750"), (7, 80, "78"), (999, 1, "0001")])]
    return [(tok("the student learns")["input_ids"], student_ids(pair, t, split=k) + eos)
            for k, t in enumerate(TEXTS)]


def completion_text(tok, prompt: list[int], completion: list[int]) -> str:
    """The completion's text as the tokenizer decodes it after its prompt (specials skipped)."""
    return tok.decode(prompt + completion, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


def decoded_ends(tok, prompt: list[int], completion: list[int]) -> list[int]:
    """Characters of completion text after each token, by decoding prefixes (specials skipped);
    None inside a character (a byte piece that does not finish it decodes to U+FFFD)."""
    base = len(tok.decode(prompt, skip_special_tokens=True))
    texts = [tok.decode(prompt + completion[:k + 1], skip_special_tokens=True) for k in range(len(completion))]
    return [None if t.endswith("\ufffd") else len(t) - base for t in texts]


@pytest.mark.parametrize("s_name,t_name", PAIRS)
def test_spans_match_decoded_boundaries(toks, s_name, t_name):
    """Independent reference: a student token ends a span iff the text after it ends at a teacher
    token boundary (both found by decoding prefixes), with the final EOS a span of its own; the
    teacher's completion decodes to the student's; everything is covered."""
    pair = TokenizerPair(toks[s_name], toks[t_name])
    s_tok, t_tok = toks[s_name], toks[t_name]
    for prompt, comp in cases(pair, s_name):
        a = pair.align(prompt, comp)
        t_comp = a.teacher_ids[a.teacher_prompt_len:]
        assert a.coverage == 1.0 and a.student_mask.all() and a.teacher_mask.all()
        assert completion_text(t_tok, a.teacher_ids[:a.teacher_prompt_len], t_comp) == \
            completion_text(s_tok, prompt, comp)
        assert t_comp[-1] == t_tok.eos_token_id
        s_ends, t_ends = decoded_ends(s_tok, prompt, comp[:-1]), decoded_ends(
            t_tok, a.teacher_ids[:a.teacher_prompt_len], t_comp[:-1])
        want = [e is not None and e in set(t_ends) for e in s_ends] + [True]
        last_of_span = list(a.student_span[:-1] != a.student_span[1:]) + [True]
        assert last_of_span == want, (s_tok.convert_ids_to_tokens(comp), t_tok.convert_ids_to_tokens(t_comp))
        assert a.num_spans == sum(want) == len(set(a.teacher_span.tolist()))
        # The teacher's prompt: its own tokenization of the student's prompt text, with its own BOS.
        text = s_tok.decode(prompt, skip_special_tokens=True)
        assert a.teacher_ids[:a.teacher_prompt_len] == t_tok(text, add_special_tokens=True)["input_ids"]


def test_spans_spell_the_same_bytes_on_sampled_tokens(toks):
    """Random student token ids (what an untrained model samples: byte pieces that split characters,
    unknowns, specials anywhere): every aligned span spells the same bytes on both sides, and
    nothing unaligned is claimed."""
    g = np.random.default_rng(0)
    for s_name, t_name in PAIRS:
        pair = TokenizerPair(toks[s_name], toks[t_name], min_coverage=0.0)
        s, t = pair.student, pair.teacher
        covered = []
        for _ in range(4):
            comp = g.integers(0, s.size, 30)
            a = pair.align(toks[s_name]("12+34=" if s_name == "char" else "the")["input_ids"], comp.tolist())
            t_comp = np.array(a.teacher_ids[a.teacher_prompt_len:])
            for k in range(a.num_spans):
                s_bytes = b"".join(s.pieces[i] or b"<%d>" % pair.special_map[i] for i in comp[a.student_span == k])
                t_bytes = b"".join(t.pieces[i] or b"<%d>" % i for i in t_comp[a.teacher_span == k])
                assert s_bytes == t_bytes
            covered.append(a.coverage)
        assert np.mean(covered) > 0.5, (s_name, t_name, covered)


def test_special_tokens_mapped_or_masked(toks):
    """BOS on the student's side only (SP adds <s>, the byte-level BPE adds none), EOS by role
    (</s> -> <|endoftext|>), a student special token the teacher lacks (<tool>) masked: the
    teacher's sequence goes without it, the text on both sides of it stays aligned."""
    pair = TokenizerPair(toks["bpe_small"], toks["sp"])
    s, t = toks["bpe_small"], toks["sp"]
    tool = s.convert_tokens_to_ids("<tool>")
    before, after = student_ids(pair, " the sum"), student_ids(pair, " 42 answer")
    a = pair.align(s("the student")["input_ids"], before + [tool] + after + [s.eos_token_id])
    assert a.teacher_ids[0] == t.bos_token_id and pair.teacher.prefix_ids == (t.bos_token_id,)
    assert a.teacher_ids[-1] == t.eos_token_id
    assert tool not in pair.special_map
    masked = np.flatnonzero(~a.student_mask)
    assert masked.tolist() == [len(before)]
    assert completion_text(t, a.teacher_ids[:a.teacher_prompt_len], a.teacher_ids[a.teacher_prompt_len:]) \
        == " the sum 42 answer"
    assert a.coverage == pytest.approx(1 - 1 / (len(" the sum 42 answer") + 2))
    # Mapping it explicitly to a teacher special token aligns it.
    mapped = TokenizerPair(s, t, special_tokens={"<tool>": "<unk>"})
    assert mapped.special_map[tool] == t.unk_token_id
    b = mapped.align(s("the student")["input_ids"], before + [tool] + after + [s.eos_token_id])
    assert b.student_mask.all() and b.coverage == 1.0
    with pytest.raises(AlignmentError, match=r"'<nope>' is not a special token of the student"):
        TokenizerPair(s, t, special_tokens={"<nope>": "</s>"})


def test_low_coverage_is_a_named_error(toks):
    pair = TokenizerPair(toks["bpe_small"], toks["sp"], min_coverage=0.6)
    s = toks["bpe_small"]
    tool = s.convert_tokens_to_ids("<tool>")
    comp = [tool] * 5 + student_ids(pair, " 12")
    with pytest.raises(AlignmentError, match=r"row 7: the alignment covers 0\.375 .* below min_coverage=0\.6"):
        pair.align(s("sum")["input_ids"], comp, where="row 7")
    assert TokenizerPair(s, toks["sp"], min_coverage=0.0).align(s("sum")["input_ids"], comp).coverage == 0.375
    with pytest.raises(ValueError, match="min_coverage must be a number in"):
        TokenizerPair(s, toks["sp"], min_coverage=1.5)


def test_text_the_teacher_cannot_spell_and_bytes_that_are_not_utf8(toks):
    """The digit-pair teacher knows no letters or spaces: only the digits align. A byte-level
    student that sampled the first byte of a two-byte character: that token is masked."""
    pair = TokenizerPair(toks["bpe"], toks["pair"], min_coverage=0.0)
    s = toks["bpe"]
    a = pair.align(s("sum")["input_ids"], student_ids(pair, " ab+1234"))
    t_comp = a.teacher_ids[a.teacher_prompt_len:]
    aligned_text = "".join(toks["pair"].convert_ids_to_tokens([t_comp[i] for i in np.flatnonzero(a.teacher_mask)]))
    assert aligned_text == "+1234" and a.coverage == pytest.approx(5 / 8)

    pair = TokenizerPair(toks["bpe"], toks["sp"], min_coverage=0.0)
    half = pair.student.pieces.index(b"\xc3")  # a lone lead byte of a two-byte character
    comp = student_ids(pair, " sum") + [half] + student_ids(pair, " 42")
    a = pair.align(s("sum")["input_ids"], comp)
    assert (~a.student_mask).nonzero()[0].tolist() == [len(student_ids(pair, " sum"))]
    assert completion_text(toks["sp"], a.teacher_ids[:a.teacher_prompt_len], a.teacher_ids[a.teacher_prompt_len:]) \
        == " sum 42"


def test_chat_templates_render_each_side(toks):
    s, t = toks["sp"], toks["bpe"]
    s.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    t.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                       "{% endif %}### {{ m.role }}: {{ m.content }}\n{% endfor %}### assistant:")
    try:
        pair = TokenizerPair(s, t)
        msgs = [{"role": "user", "content": "add 12 and 30"}]
        prompt = s.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        a = pair.align(prompt, student_ids(pair, " 42") + [s.eos_token_id], messages=msgs)
        want = t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert a.teacher_ids[:a.teacher_prompt_len] == list(want) and a.coverage == 1.0
        with pytest.raises(AlignmentError, match="row 3: the teacher's chat template cannot render.*no system role"):
            pair.align(prompt, [s.eos_token_id], messages=[{"role": "system", "content": "x"}] + msgs, where="row 3")
        t.chat_template = None
        with pytest.raises(AlignmentError, match="chat template on both sides; the teacher tokenizer has none"):
            TokenizerPair(s, t).align(prompt, [s.eos_token_id], messages=msgs)
    finally:
        s.chat_template = t.chat_template = None


def test_missing_tokenizer_and_bad_ids_are_named_errors(toks):
    with pytest.raises(AlignmentError, match="needs the student's tokenizer"):
        TokenizerPair(None, toks["sp"])
    with pytest.raises(AlignmentError, match="needs the teacher's tokenizer"):
        TokenizerPair(toks["sp"], None)
    pair = TokenizerPair(toks["char"], toks["pair"])
    with pytest.raises(AlignmentError, match=r"row 2: student token id 99 is outside .* vocabulary \[0, 14\)"):
        pair.align([3], [4, 99], where="row 2")


def test_shared_vocabulary(toks):
    """The 1:1 map pairs tokens that spell the same bytes; special tokens by the special map."""
    char, pair_tok = toks["char"], toks["pair"]
    pair = TokenizerPair(char, pair_tok)
    got = {char.convert_ids_to_tokens(int(s)): pair_tok.convert_ids_to_tokens(int(t))
           for s, t in zip(pair.shared_student_ids, pair.shared_teacher_ids)}
    want = {str(d): str(d) for d in range(10)} | {"+": "+", "=": "=", "<pad>": "<pad>", "<eos>": "</s>"}
    assert got == want
    sp_bpe = TokenizerPair(toks["sp"], toks["bpe"])
    s_ids, t_ids = sp_bpe.shared_student_ids, sp_bpe.shared_teacher_ids
    assert np.all(np.diff(s_ids) > 0) and len(np.unique(t_ids)) == len(t_ids)
    by_student = dict(zip(toks["sp"].convert_ids_to_tokens(s_ids.tolist()),
                          toks["bpe"].convert_ids_to_tokens(t_ids.tolist())))
    assert by_student["▁the"] == "Ġthe" and by_student["</s>"] == "<|endoftext|>"
    # SP's byte piece for 'a' gives way to its ordinary 'a'.
    assert "<0x61>" not in by_student and by_student["a"] == "a"


def test_one_to_one_spans_and_packed_rows(toks):
    """Packed rows: each student row predicting a completion token carries its span, and the rows
    of one-to-one spans predict paired tokens on both sides."""
    pair = TokenizerPair(toks["char"], toks["pair"])
    seqs = cases(pair, "char")
    aligns = [pair.align(p, c) for p, c in seqs]
    a = aligns[0]  # 123+456= 9750<eos>: teacher 97|50|</s>
    assert a.student_span.tolist() == [0, 0, 1, 1, 2] and a.one_to_one.tolist() == [False, False, True]
    assert a.student_shared_mask.tolist() == [False, False, False, False, True]
    packed = pack_alignments(aligns, [len(p) for p, _ in seqs], [len(p) + len(c) for p, c in seqs])
    s_tokens = [i for p, c in seqs for i in p + c]
    t_tokens = [i for al in aligns for i in al.teacher_ids]
    s_targets = torch.tensor(s_tokens[1:] + [0])
    t_targets = torch.tensor(t_tokens[1:] + [0])
    assert packed.student_row_span.shape == (len(s_tokens),) and packed.teacher_row_span.shape == (len(t_tokens),)
    assert packed.num_spans == sum(al.num_spans for al in aligns)
    to_teacher = dict(zip(pair.shared_student_ids.tolist(), pair.shared_teacher_ids.tolist()))
    assert len(packed.shared_student_rows) == sum(al.one_to_one.sum() for al in aligns) > 0
    for s_row, t_row in zip(packed.shared_student_rows.tolist(), packed.shared_teacher_rows.tolist()):
        assert to_teacher[int(s_targets[s_row])] == int(t_targets[t_row])
        assert packed.student_row_span[s_row] == packed.teacher_row_span[t_row]
    # Each span's student rows and teacher rows predict the same text.
    vocab_s, vocab_t = toks["char"].convert_ids_to_tokens, toks["pair"].convert_ids_to_tokens
    for k in range(packed.num_spans):
        s_text = "".join(vocab_s(s_targets[packed.student_row_span == k].tolist()))
        t_text = "".join(vocab_t(t_targets[packed.teacher_row_span == k].tolist()))
        assert s_text.replace("<eos>", "</s>") == t_text
    mask = (packed.student_row_span >= 0).float()
    cov = packed.coverage(mask)
    assert cov["span"] == cov["tokens"] == sum(len(c) for _, c in seqs) and 0 < cov["shared"] < cov["span"]
    # A student row padded to its token multiple: the padding is in no span, the rest unchanged.
    padded = pack_alignments(aligns, [len(p) for p, _ in seqs], [len(p) + len(c) for p, c in seqs], padding=3)
    assert padded.student_row_span[:len(s_tokens)].equal(packed.student_row_span)
    assert padded.student_row_span[len(s_tokens):].tolist() == [-1, -1, -1]
    assert padded.teacher_row_span.equal(packed.teacher_row_span)
