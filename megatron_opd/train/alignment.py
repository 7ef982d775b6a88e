"""Cross-tokenizer alignment: the teacher's tokenization of the student's text, and the spans of
text that are whole tokens on both sides.

Both sides are laid on one coordinate: the completion's bytes, with each special token (BOS, EOS,
template markers, unknown) as one unit of its own. A student token covers the bytes it spells; the
teacher's completion is its own tokenization of the same text, encoded run by run between the
student's special tokens, so that its tokens cover the same bytes. A span is the smallest run of
the coordinate whose two ends are token boundaries on both sides; it is *aligned* when the
tokens of both sides cover it exactly and every teacher token in it spells its own bytes (an
unknown-token piece does not). Special tokens are mapped explicitly (a given map, the same
content, or the same role: BOS to BOS, EOS to EOS); one without a counterpart is a unit that only
the student has, so its span is never aligned and the teacher's sequence goes without it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

ROLES = ("bos_token", "eos_token")  # special tokens that map to the other side's token of the same role
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNDECODABLE = re.compile("[\udc80-\udcff]+")  # bytes that are not UTF-8, after surrogateescape


class AlignmentError(ValueError):
    """Input that cross-tokenizer alignment cannot use: a missing tokenizer, a chat template that does
    not render, or an alignment that covers too little of the text."""


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder["type"] == "Sequence":
        return [s for d in decoder["decoders"] for s in _decoder_steps(d)]
    return [decoder]


def _spell(piece: str, steps: list[dict], byte_chars: dict[str, int], what: str) -> tuple[bytes | None, bool]:
    """The bytes a (non-special) token spells inside a text, and whether it is a byte-fallback piece.

    Runs the tokenizer's decoder steps on one token, leaving out what only a whole text's ends get
    (``Strip``, Metaspace's removal of the first space)."""
    value: str | bytes = piece
    fallback = False
    for step in steps:
        kind = step["type"]
        if kind in ("Fuse", "Strip") or isinstance(value, bytes):
            continue
        if kind == "Replace":
            pattern = step["pattern"]
            if "String" in pattern:
                value = value.replace(pattern["String"], step["content"])
            else:
                value = re.sub(pattern["Regex"], step["content"], value)
        elif kind == "ByteFallback":
            m = _BYTE_PIECE.fullmatch(value)
            if m:
                value, fallback = bytes([int(m.group(1), 16)]), True
        elif kind == "Metaspace":
            value = value.replace(step["replacement"], " ")
        elif kind == "ByteLevel":
            if any(c not in byte_chars for c in value):
                return None, False
            value = bytes(byte_chars[c] for c in value)
        elif kind == "BPEDecoder":
            value = value.replace(step["suffix"], " ")
        else:
            raise AlignmentError(f"{what} tokenizer: decoder step {kind!r} is not supported by cross-tokenizer "
                                 "alignment (supported: ByteLevel, Metaspace, Replace, ByteFallback, Fuse, "
                                 "Strip, BPEDecoder)")
    return (value.encode("utf-8") if isinstance(value, str) else value), fallback


def _continuation_json(spec: dict) -> dict:
    """The tokenizer spec with what only a text's start gets switched off (a dummy-prefix space, a
    prefix space) and no post-processor (no BOS/EOS added): it encodes text that continues a sequence."""
    spec = json.loads(json.dumps(spec))

    def normalizer(n):
        if n is None:
            return None
        if n["type"] == "Prepend":
            return None
        if n["type"] == "Sequence":
            n["normalizers"] = [m for m in map(normalizer, n["normalizers"]) if m is not None]
        return n

    def pre_tokenizer(p):
        if p is None:
            return None
        if p["type"] == "Metaspace":
            p["prepend_scheme"] = "never"
            p.pop("add_prefix_space", None)
        elif p["type"] == "ByteLevel":
            p["add_prefix_space"] = False
        elif p["type"] == "Sequence":
            p["pretokenizers"] = [pre_tokenizer(q) for q in p["pretokenizers"]]
        return p

    spec["normalizer"] = normalizer(spec.get("normalizer"))
    spec["pre_tokenizer"] = pre_tokenizer(spec.get("pre_tokenizer"))
    spec["post_processor"] = None
    return spec


@dataclass(frozen=True, eq=False)
class ByteVocab:
    """A tokenizer seen as bytes: what each token id spells inside a text, which ids are special
    (they spell nothing: BOS, EOS, template markers, unknown), and an encoder for text that
    continues a sequence."""

    tokenizer: Any
    name: str                       # "student" / "teacher", for errors
    pieces: tuple                   # per id: bytes, or None for special ids
    lengths: np.ndarray             # [V] int64 byte length per id (0 for special ids)
    special: np.ndarray             # [V] bool
    byte_fallback: np.ndarray       # [V] bool: an SP <0xHH> piece
    continuation: Any               # tokenizers.Tokenizer without dummy prefix and post-processor
    prefix_ids: tuple[int, ...]     # what add_special_tokens=True puts before a text (e.g. BOS)

    @classmethod
    def of(cls, tokenizer, *, name: str) -> ByteVocab:
        if tokenizer is None:
            raise AlignmentError(f"cross-tokenizer distillation needs the {name}'s tokenizer (none was found "
                                 f"next to the {name} model)")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise AlignmentError(f"{name} tokenizer {type(tokenizer).__name__} is not backed by the `tokenizers` "
                                 "library; cross-tokenizer alignment needs its decoder and pre-tokenizer")
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        vocab = tokenizer.get_vocab()
        size = max(vocab.values()) + 1
        by_id = [None] * size
        for tok, i in vocab.items():
            by_id[i] = tok
        special_ids = set(tokenizer.all_special_ids)
        special_ids.update(a["id"] for a in spec.get("added_tokens", []) if a.get("special"))
        literal = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}
        steps, byte_chars = _decoder_steps(spec.get("decoder")), _byte_level_chars()
        pieces, fallback = [], np.zeros(size, dtype=bool)
        for i, tok in enumerate(by_id):
            if tok is None or i in special_ids:
                pieces.append(None)
            elif i in literal:  # added tokens are matched as written, not through the decoder
                pieces.append(tok.encode("utf-8"))
            else:
                b, fallback[i] = _spell(tok, steps, byte_chars, name)
                pieces.append(b)
        special = np.array([p is None for p in pieces], dtype=bool)  # unspellable ids count as special
        lengths = np.array([0 if p is None else len(p) for p in pieces], dtype=np.int64)
        with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        prefix = next((with_specials[:k] for k in range(len(with_specials) - len(without) + 1)
                       if with_specials[k:k + len(without)] == without), [])
        continuation = Tokenizer.from_str(json.dumps(_continuation_json(spec)))
        return cls(tokenizer, name, tuple(pieces), lengths, special, fallback, continuation, tuple(prefix))

    @property
    def size(self) -> int:
        return len(self.pieces)

    def special_id(self, role: str) -> int | None:
        i = getattr(self.tokenizer, f"{role}_id", None)
        return i if i is not None and 0 <= i < self.size else None

    def check_ids(self, ids: np.ndarray, where: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = int(ids[(ids < 0) | (ids >= self.size)][0])
            raise AlignmentError(f"{where}: {self.name} token id {bad} is outside its tokenizer's "
                                 f"vocabulary [0, {self.size})")


def shared_vocabulary(student: ByteVocab, teacher: ByteVocab, special_map: dict[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The 1:1 map between the vocabularies: ``(student ids, teacher ids)``, sorted by student id.

    Two ordinary tokens pair up when they spell the same bytes and no other token of either side
    does (an SP byte-fallback piece ``<0x41>`` gives way to an ordinary ``A``); special tokens pair
    up as ``special_map`` says, where no other student special token maps to the same one."""
    def unique_spellings(side: ByteVocab) -> dict[bytes, int]:
        best: dict[bytes, int] = {}
        clash: set[bytes] = set()
        for i, piece in enumerate(side.pieces):
            if piece is None:
                continue
            j = best.get(piece)
            if j is None:
                best[piece] = i
            elif side.byte_fallback[j] != side.byte_fallback[i]:
                best[piece] = j if not side.byte_fallback[j] else i
            else:
                clash.add(piece)
        return {b: i for b, i in best.items() if b not in clash}

    s_map, t_map = unique_spellings(student), unique_spellings(teacher)
    pairs = {s_map[b]: t_map[b] for b in s_map.keys() & t_map.keys()}
    targets = list(special_map.values())
    pairs.update({s: t for s, t in special_map.items() if targets.count(t) == 1})  # one-to-one only
    s_ids = np.array(sorted(pairs), dtype=np.int64)
    return s_ids, np.array([pairs[i] for i in s_ids], dtype=np.int64)


@dataclass(frozen=True)
class Alignment:
    """One sequence aligned: the teacher's token ids, and per completion token of each side the
    aligned span it belongs to (``-1``: none)."""

    teacher_ids: list[int]           # the teacher's prompt, then its completion
    teacher_prompt_len: int
    student_span: np.ndarray         # [student completion tokens] int64
    teacher_span: np.ndarray         # [teacher completion tokens] int64
    one_to_one: np.ndarray           # [num_spans] bool: one token on each side, ids paired by the 1:1 map
    coverage: float                  # fraction of the completion's units (bytes, special tokens) aligned

    @property
    def num_spans(self) -> int:
        return len(self.one_to_one)

    @property
    def student_mask(self) -> np.ndarray:
        return self.student_span >= 0

    @property
    def teacher_mask(self) -> np.ndarray:
        return self.teacher_span >= 0

    @property
    def student_shared_mask(self) -> np.ndarray:
        """Student completion tokens whose span is one token on both sides, paired by the 1:1 map."""
        shared = np.zeros(len(self.student_span), dtype=bool)
        inside = self.student_mask
        shared[inside] = self.one_to_one[self.student_span[inside]]
        return shared


@dataclass(frozen=True)
class _Piece:
    """A stretch of student text for the teacher to encode: its coordinate and its bytes."""

    start: int
    text: str
    data: bytes


class TokenizerPair:
    """The student's and the teacher's tokenizers, for aligning the student's sequences.

    ``special_tokens`` maps student special-token strings to teacher ones (``{"<|im_end|>":
    "<end_of_turn>"}``); other special tokens map to the teacher's token with the same content,
    then to the one with the same role (BOS, EOS); the rest are masked. An alignment covering less
    than ``min_coverage`` of a completion raises :class:`AlignmentError`."""

    def __init__(self, student_tokenizer, teacher_tokenizer, *, special_tokens: dict[str, str] | None = None,
                 min_coverage: float = 0.5, min_coverage_name: str = "min_coverage"):
        if isinstance(min_coverage, bool) or not isinstance(min_coverage, (int, float)) or not 0 <= min_coverage <= 1:
            raise ValueError(f"min_coverage must be a number in [0, 1], got {min_coverage!r}")
        self.student = ByteVocab.of(student_tokenizer, name="student")
        self.teacher = ByteVocab.of(teacher_tokenizer, name="teacher")
        self.min_coverage, self.min_coverage_name = float(min_coverage), min_coverage_name
        self.special_map = self._special_map(special_tokens or {})
        self.shared_student_ids, self.shared_teacher_ids = shared_vocabulary(self.student, self.teacher,
                                                                             self.special_map)
        self._to_teacher = np.full(self.student.size, -1, dtype=np.int64)
        self._to_teacher[self.shared_student_ids] = self.shared_teacher_ids

    def _special_map(self, given: dict[str, str]) -> dict[int, int]:
        s_vocab, t_vocab = self.student.tokenizer.get_vocab(), self.teacher.tokenizer.get_vocab()
        out = {}
        for s_tok, t_tok in given.items():
            for tok, vocab, side in ((s_tok, s_vocab, self.student), (t_tok, t_vocab, self.teacher)):
                if tok not in vocab or not side.special[vocab[tok]]:
                    raise AlignmentError(f"special_tokens: {tok!r} is not a special token of the {side.name} "
                                         "tokenizer")
            out[s_vocab[s_tok]] = t_vocab[t_tok]
        t_special = {tok: i for tok, i in t_vocab.items() if self.teacher.special[i]}
        unk = {self.student.special_id("unk_token")}
        for tok, i in s_vocab.items():
            if self.student.special[i] and i not in out and i not in unk and tok in t_special \
                    and t_special[tok] != self.teacher.special_id("unk_token"):
                out[i] = t_special[tok]
        for role in ROLES:
            s, t = self.student.special_id(role), self.teacher.special_id(role)
            if s is not None and t is not None and s not in out:
                out[s] = t
        return out

    # --- the teacher's prompt ------------------------------------------------------------------

    def teacher_prompt(self, student_prompt_ids: Sequence[int], *, messages: list[dict] | None = None,
                       text: str | None = None, where: str = "prompt") -> list[int]:
        """The teacher's prompt: its chat template's rendering of ``messages``; else its tokenization
        (with its own BOS, if it adds one) of ``text``, or of the student's prompt decoded without
        special tokens."""
        return self.teacher_prompts([student_prompt_ids], messages=[messages], texts=[text], where=[where])[0]

    def teacher_prompts(self, prompts: Sequence[Sequence[int]], *, messages: Sequence[list[dict] | None],
                        texts: Sequence[str | None], where: Sequence[str]) -> list[list[int]]:
        """:meth:`teacher_prompt` of many prompts; plain-text ones are decoded and encoded in one
        batch each, once per distinct prompt."""
        out: list[list[int] | None] = [None] * len(prompts)
        plain: dict[tuple, list[int]] = {}  # (token ids, text) -> indices
        for i, (ids, msgs, text) in enumerate(zip(prompts, messages, texts)):
            if msgs is not None:
                out[i] = self._render(msgs, where[i])
            else:
                plain.setdefault((tuple(ids), text), []).append(i)
        if plain:
            keys = list(plain)
            undecoded = [list(ids) for ids, text in keys if text is None]
            decoded = iter(self.student.tokenizer.backend_tokenizer.decode_batch(undecoded, skip_special_tokens=True)
                           if undecoded else [])
            strings = [next(decoded) if text is None else text for _, text in keys]
            encodings = self.teacher.tokenizer.backend_tokenizer.encode_batch(strings, add_special_tokens=False)
            for key, enc in zip(keys, encodings):
                for i in plain[key]:
                    out[i] = list(self.teacher.prefix_ids) + list(enc.ids)
        return out

    def _render(self, messages: list[dict], where: str) -> list[int]:
        for side in (self.student, self.teacher):
            if not getattr(side.tokenizer, "chat_template", None):
                raise AlignmentError(f"{where}: chat messages need a chat template on both sides; the "
                                     f"{side.name} tokenizer has none")
        try:
            ids = self.teacher.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=False)
        except Exception as e:  # jinja2 errors, raise_exception() in a template, bad roles
            raise AlignmentError(f"{where}: the teacher's chat template cannot render these messages: "
                                 f"{type(e).__name__}: {e}") from e
        return list(ids)

    # --- alignment -----------------------------------------------------------------------------

    def align(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], *,
              messages: list[dict] | None = None, prompt_text: str | None = None, where: str = "sequence"
              ) -> Alignment:
        return self.align_batch([prompt_ids], [completion_ids], messages=None if messages is None else [messages],
                                prompt_texts=None if prompt_text is None else [prompt_text], where=[where])[0]

    def align_batch(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                    messages: Sequence[list[dict] | None] | None = None,
                    prompt_texts: Sequence[str | None] | None = None,
                    where: Sequence[str] | None = None) -> list[Alignment]:
        """Align every ``(prompt, completion)`` of the student (token ids); the teacher encodes all
        their text in one batch."""
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"{n} prompts but {len(completions)} completions")
        where = list(where) if where is not None else [f"sequence {i}" for i in range(n)]
        messages = list(messages) if messages is not None else [None] * n
        prompt_texts = list(prompt_texts) if prompt_texts is not None else [None] * n
        layouts, texts = [], []
        for i in range(n):
            ids = np.asarray(completions[i], dtype=np.int64).reshape(-1)
            self.student.check_ids(ids, where[i])
            self.student.check_ids(np.asarray(prompts[i], dtype=np.int64).reshape(-1), where[i])
            layout = self._student_layout(ids)
            layouts.append(layout)
            texts.extend(p.text for p in layout[2])
        encodings = self.teacher.continuation.encode_batch(texts, add_special_tokens=False) if texts else []
        teacher_prompts = self.teacher_prompts(prompts, messages=messages, texts=prompt_texts, where=where)
        out, k = [], 0
        for i, ((ids, s_end, pieces, atoms), prompt) in enumerate(zip(layouts, teacher_prompts)):
            encs = encodings[k:k + len(pieces)]
            k += len(pieces)
            if not prompt:
                raise AlignmentError(f"{where[i]}: the teacher's prompt is empty (nothing to condition its first "
                                     "completion token on)")
            out.append(self._align_one(ids, s_end, pieces, atoms, encs, prompt, where[i]))
        return out

    def _student_layout(self, ids: np.ndarray):
        """The student's tokens on the coordinate: ends, the text pieces between special tokens
        (split where the bytes are not UTF-8: the teacher cannot read those), and the special tokens."""
        s = self.student
        atom = s.special[ids] | (s.lengths[ids] == 0)
        width = np.where(atom, 1, s.lengths[ids])
        s_end = np.cumsum(width)
        s_start = s_end - width
        pieces, atoms = [], np.flatnonzero(atom)
        cuts = np.concatenate([[-1], atoms, [len(ids)]])
        for a, b in zip(cuts[:-1] + 1, cuts[1:]):
            if a >= b:
                continue
            data = b"".join(s.pieces[j] for j in ids[a:b])
            text = data.decode("utf-8", errors="surrogateescape")
            start = int(s_start[a])
            pos, chars = 0, 0
            for m in _UNDECODABLE.finditer(text):
                if m.start() > chars:
                    good = text[chars:m.start()]
                    n_bytes = len(good.encode("utf-8"))
                    pieces.append(_Piece(start + pos, good, data[pos:pos + n_bytes]))
                    pos += n_bytes
                pos += m.end() - m.start()  # one surrogate per undecodable byte
                chars = m.end()
            if chars < len(text):
                pieces.append(_Piece(start + pos, text[chars:], data[pos:]))
        return ids, s_end, pieces, atoms

    def _teacher_tokens(self, piece: _Piece, enc) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A piece's teacher ids with their coordinates and whether each spells its own bytes."""
        t = self.teacher
        ids = np.asarray(enc.ids, dtype=np.int64)
        lengths = t.lengths[ids]
        if not t.special[ids].any() and int(lengths.sum()) == len(piece.data) \
                and b"".join(t.pieces[j] for j in ids) == piece.data:
            end = piece.start + np.cumsum(lengths)
            return ids, end - lengths, end, np.ones(len(ids), dtype=bool)
        # Unknown pieces, or tokens that do not spell the text they stand for: place every token by
        # the encoder's character offsets, and mark the ones whose bytes differ.
        char_bytes = np.frombuffer(piece.text.encode("utf-32-le"), dtype=np.uint32)
        char_bytes = 1 + (char_bytes >= 0x80) + (char_bytes >= 0x800) + (char_bytes >= 0x10000)
        byte_at = np.concatenate([[0], np.cumsum(char_bytes)])
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        start, end = byte_at[offsets[:, 0]], byte_at[offsets[:, 1]]
        exact = np.array([p is not None and p == piece.data[a:b]
                          for p, a, b in zip((t.pieces[j] for j in ids), start, end)], dtype=bool)
        exact[1:] &= start[1:] >= end[:-1]  # overlapping offsets (byte pieces of one character)
        return ids, piece.start + start, piece.start + end, exact

    def _align_one(self, ids, s_end, pieces, atoms, encs, prompt: list[int], where: str) -> Alignment:
        total = int(s_end[-1]) if len(ids) else 0
        parts = [self._teacher_tokens(p, e) for p, e in zip(pieces, encs)]
        for a in atoms:
            t_id = self.special_map.get(int(ids[a]))
            if t_id is not None:
                pos = int(s_end[a]) - 1
                parts.append((np.array([t_id]), np.array([pos]), np.array([pos + 1]), np.ones(1, dtype=bool)))
        parts.sort(key=lambda p: int(p[1][0]) if len(p[1]) else -1)
        empty = np.zeros(0, dtype=np.int64)
        t_ids, t_start, t_end, t_exact = (np.concatenate([p[k] for p in parts]) if parts else empty
                                          for k in range(4))
        t_exact = t_exact.astype(bool)
        s_width = np.diff(np.concatenate([[0], s_end]))
        # Span boundaries: the coordinates that are token boundaries on both sides.
        # Span boundaries: the coordinates that are token boundaries on both sides (the ends of the
        # completion are; so are the edges of the teacher's gaps, which only a student token fills).
        s_bounds = np.concatenate([[0], s_end])
        common = np.intersect1d(s_bounds, np.union1d(np.union1d(t_start, t_end), [0, total]))
        if total == 0:
            s_span, t_span = np.zeros(0, dtype=np.int64), np.full(len(t_ids), -1)
            one = np.zeros(0, dtype=bool)
            coverage = 1.0
        else:
            num = len(common) - 1
            s_raw = np.searchsorted(common, s_end - s_width, side="right") - 1
            t_raw = np.searchsorted(common, t_start, side="right") - 1
            length = np.diff(common)
            s_cover = np.bincount(s_raw, weights=s_width, minlength=num)
            t_cover = np.bincount(t_raw, weights=t_end - t_start, minlength=num)
            inexact = np.bincount(t_raw[~t_exact], minlength=num)
            valid = (s_cover == length) & (t_cover == length) & (inexact == 0)
            renumber = np.cumsum(valid) - 1
            s_span = np.where(valid[s_raw], renumber[s_raw], -1)
            t_span = np.where(valid[t_raw], renumber[t_raw], -1)
            # One token on each side, paired by the 1:1 map.
            n_s = np.bincount(s_span[s_span >= 0], minlength=int(valid.sum()))
            n_t = np.bincount(t_span[t_span >= 0], minlength=int(valid.sum()))
            one = (n_s == 1) & (n_t == 1)
            s_of, t_of = np.full(len(one), -1), np.full(len(one), -1)
            s_of[s_span[s_span >= 0]] = ids[s_span >= 0]
            t_of[t_span[t_span >= 0]] = t_ids[t_span >= 0]
            one &= self._to_teacher[np.maximum(s_of, 0)] == t_of
            coverage = float(length[valid].sum()) / total
        if coverage < self.min_coverage:
            raise AlignmentError(f"{where}: the alignment covers {coverage:.3f} of the completion's text, below "
                                 f"{self.min_coverage_name}={self.min_coverage} (special tokens without a teacher counterpart, "
                                 "bytes that are not UTF-8, or text the teacher's tokenizer cannot spell)")
        return Alignment(prompt + [int(i) for i in t_ids], len(prompt), s_span.astype(np.int64),
                         t_span.astype(np.int64), one, coverage)


# --- packing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedAlignment:
    """Alignments of the sequences of one packed student micro-batch and the teacher's micro-batch
    holding the same sequences in the same order, as rows: row ``p`` of a packed sequence holds
    the logits that predict its token ``p + 1``."""

    student_row_span: torch.Tensor   # [L_student] long: span (numbered over the pack) of the predicted token, -1 none
    teacher_row_span: torch.Tensor   # [L_teacher] long
    num_spans: int
    shared_student_rows: torch.Tensor  # [N] long: rows of one-to-one spans in the student's pack
    shared_teacher_rows: torch.Tensor  # [N] long: the same spans' rows in the teacher's pack

    def coverage(self, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trained student tokens covered by each objective: ``{"span": n, "shared": n, "tokens": n}``."""
        trained = loss_mask.reshape(-1) != 0
        shared = torch.zeros_like(trained)
        shared[self.shared_student_rows] = True
        return {"span": (trained & (self.student_row_span >= 0)).sum(), "shared": (trained & shared).sum(),
                "tokens": trained.sum()}


def pack_alignments(alignments: Sequence[Alignment], student_prompt_lens: Sequence[int],
                    student_lengths: Sequence[int], *, padding: int = 0, device=None) -> PackedAlignment:
    """The rows of ``alignments`` when the student's sequences (``prompt_len``, total length) are
    packed in this order, followed by ``padding`` tokens in no span, and the teacher's
    ``teacher_ids`` are packed in the same order."""
    if not len(alignments) == len(student_prompt_lens) == len(student_lengths):
        raise ValueError(f"{len(alignments)} alignments, {len(student_prompt_lens)} prompt lengths and "
                         f"{len(student_lengths)} lengths")
    s_rows, t_rows, sh_s, sh_t = [], [], [], []
    spans = 0
    for a, p_len, n in zip(alignments, student_prompt_lens, student_lengths):
        if n - p_len != len(a.student_span):
            raise ValueError(f"a sequence of {n} tokens with a {p_len}-token prompt has {n - p_len} completion "
                             f"tokens, its alignment {len(a.student_span)}")
        s = np.full(n, -1, dtype=np.int64)
        s[p_len - 1:n - 1] = np.where(a.student_span >= 0, a.student_span + spans, -1)
        t = np.full(len(a.teacher_ids), -1, dtype=np.int64)
        t[a.teacher_prompt_len - 1:len(a.teacher_ids) - 1] = np.where(a.teacher_span >= 0, a.teacher_span + spans, -1)
        s_off, t_off = sum(len(x) for x in s_rows), sum(len(x) for x in t_rows)
        one = np.flatnonzero(a.one_to_one)
        # A one-to-one span has one token per side: its row is where that token is predicted.
        s_pos = np.full(a.num_spans, -1, dtype=np.int64)
        t_pos = np.full(a.num_spans, -1, dtype=np.int64)
        s_pos[a.student_span[a.student_mask]] = np.flatnonzero(a.student_mask) + p_len - 1
        t_pos[a.teacher_span[a.teacher_mask]] = np.flatnonzero(a.teacher_mask) + a.teacher_prompt_len - 1
        sh_s.append(s_pos[one] + s_off)
        sh_t.append(t_pos[one] + t_off)
        s_rows.append(s)
        t_rows.append(t)
        spans += a.num_spans
    s_rows.append(np.full(padding, -1, dtype=np.int64))

    def cat(xs):
        return torch.from_numpy(np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)).to(device)

    return PackedAlignment(cat(s_rows), cat(t_rows), spans, cat(sh_s), cat(sh_t))
