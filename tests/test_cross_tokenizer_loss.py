"""Cross-tokenizer losses: the span-level reverse-KL signal against a float64 reference built from
transformers on both models, a model distilled into itself through another tokenization, and the
shared-vocabulary divergence against an unsharded float64 reference at TP 1/2 on both sides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_alignment import cases, decoded_ends
from test_divergence import RecordCollectives, reference_kind

from megatron_opd.losses.cross_tokenizer import (SharedVocab, route_shared_logprobs, shared_vocab_divergence,
                                                 span_reverse_kl, teacher_shared_logprobs)
from megatron_opd.losses.logprobs import token_logprobs
from megatron_opd.tasks.arithmetic import VOCAB, make_pair_tokenizer, make_tokenizer
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny import make_hf_model
from megatron_opd.testing.tiny_tokenizers import make_byte_level_bpe, make_sentencepiece_bpe
from megatron_opd.train.alignment import TokenizerPair, pack_alignments

MODEL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             num_hidden_layers=2, max_position_embeddings=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP regions stall when the machine's cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_loss_tokenizers")
    return {
        "sp": make_sentencepiece_bpe(root / "sp", vocab_size=350, add_bos=True),
        "sp_big": make_sentencepiece_bpe(root / "sp_big", vocab_size=420, add_bos=False, seed=3),
        "bpe": make_byte_level_bpe(root / "bpe", vocab_size=420, bos="<|begin|>"),
        "bpe_small": make_byte_level_bpe(root / "bpe_small", vocab_size=300, extra_special=("<tool>",), seed=2),
        "char": make_tokenizer(root / "char"),
        "pair": make_pair_tokenizer(root / "pair"),
    }


def tiny_lm(root, vocab_size: int, seed: int):
    """A tiny random Llama of ``vocab_size`` (a few rows more than the tokenizer: padding)."""
    from transformers import AutoModelForCausalLM

    path = make_hf_model(root / f"lm_{vocab_size}_{seed}", "llama", seed=seed, vocab_size=vocab_size, **MODEL)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``log p(ids[k + 1] | ids[:k + 1])`` for every k, in the model's dtype."""
    logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[:, 0]


def reference_spans(tok, prompt, completion) -> list[int | None]:
    return decoded_ends(tok, prompt, completion[:-1])


def reference_span_ids(s_ends, t_ends) -> list[int]:
    """Span of each token: a new span starts after every token that ends at a boundary both sides have
    (the final EOS is a span of its own)."""
    common = {e for e in s_ends if e is not None} & {e for e in t_ends if e is not None}
    span, out = 0, []
    for e in s_ends:
        out.append(span)
        span += e in common
    return out + [span]


PAIRS = [("sp", "bpe"), ("bpe", "sp_big"), ("bpe_small", "sp"), ("char", "pair")]


@pytest.mark.parametrize("s_name,t_name", PAIRS)
def test_span_signal_matches_transformers_float64(toks, tmp_path, s_name, t_name):
    """Ours (fp32 logits of both models, packed, alignment, vocab-parallel log-probs) against float64
    transformers forwards with spans found by decoding prefixes: per-span log-ratios, per-token
    advantages and the gradient of the loss w.r.t. the student's logits. The pairs differ in merges,
    vocabulary size, BOS (on one side only) and EOS strings."""
    s_tok, t_tok = toks[s_name], toks[t_name]
    pair = TokenizerPair(s_tok, t_tok)
    student = tiny_lm(tmp_path, pair.student.size + 5, seed=1)
    teacher = tiny_lm(tmp_path, pair.teacher.size + 3, seed=2)
    seqs = cases(pair, s_name)
    aligns = [pair.align(p, c) for p, c in seqs]
    packed = pack_alignments(aligns, [len(p) for p, _ in seqs], [len(p) + len(c) for p, c in seqs])

    # Ours: fp32, everything packed.
    s_tokens = [i for p, c in seqs for i in p + c]
    t_tokens = [i for a in aligns for i in a.teacher_ids]
    with torch.no_grad():
        s_logits = torch.cat([student(torch.tensor([p + c])).logits[0] for p, c in seqs])
        t_logits = torch.cat([teacher(torch.tensor([a.teacher_ids])).logits[0] for a in aligns])
    s_logits.requires_grad_()
    t_lp = token_logprobs(t_logits, torch.tensor(t_tokens[1:] + [0]), chunk_size=7)
    sig = span_reverse_kl(s_logits, torch.tensor(s_tokens[1:] + [0]), t_lp, student_span=packed.student_row_span,
                          teacher_span=packed.teacher_row_span, num_spans=packed.num_spans, chunk_size=5)
    sig.loss.sum().backward()

    # Reference: float64 models, spans from decoded text, autograd through log_softmax.
    student64, teacher64 = student.double(), teacher.double()
    ref_ratio, ref_adv, ref_grad = [], [], []
    for (p, c), a in zip(seqs, aligns):
        tp_, tc = a.teacher_ids[:a.teacher_prompt_len], a.teacher_ids[a.teacher_prompt_len:]
        s_span = reference_span_ids(reference_spans(s_tok, p, c), reference_spans(t_tok, tp_, tc))
        t_span = reference_span_ids(reference_spans(t_tok, tp_, tc), reference_spans(s_tok, p, c))
        with torch.no_grad():
            logits64 = student64(torch.tensor([p + c])).logits[0]
            t_lp64 = next_token_logprobs(teacher64, tp_ + tc)[len(tp_) - 1:]
        logits64.requires_grad_()
        s_lp64 = torch.log_softmax(logits64[:-1], -1).gather(-1, torch.tensor(p + c)[1:, None])[:, 0][len(p) - 1:]
        num = s_span[-1] + 1
        ratio = torch.zeros(num, dtype=torch.float64)
        ratio.index_add_(0, torch.tensor(s_span), s_lp64.detach())
        ratio.index_add_(0, torch.tensor(t_span), -t_lp64)
        adv = -ratio[torch.tensor(s_span)]
        (-(adv * s_lp64).sum()).backward()
        ref_ratio.append(ratio)
        ref_adv.append(torch.cat([torch.zeros(len(p) - 1), adv, torch.zeros(1)]))
        ref_grad.append(logits64.grad)
    ref_ratio, ref_adv, ref_grad = torch.cat(ref_ratio), torch.cat(ref_adv), torch.cat(ref_grad)
    assert sig.valid.all() and len(sig.log_ratio) == len(ref_ratio)
    assert ref_ratio.abs().max() > 0.5  # the two models disagree: the signal is not trivially zero
    assert (sig.log_ratio.double() - ref_ratio).abs().max() < 2e-5
    assert (sig.advantage.double() - ref_adv).abs().max() < 2e-5
    assert (s_logits.grad.double() - ref_grad).abs().max() < 2e-5
    # Sums over tokens of the per-token divergence are sums over spans.
    assert sig.divergence.sum().item() == pytest.approx(sig.log_ratio.sum().item(), abs=1e-4)


def permuted_char_tokenizer(out_dir, perm: list[int]):
    """The demo's characters under other ids (character ``VOCAB[perm[t]]`` gets id ``t``), EOS written
    ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [VOCAB[i].replace("<eos>", "</s>") for i in perm]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("</s>|<pad>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def arithmetic_sequences(tok, *, num: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Prompts of the task and random completions of its characters (EOS appended)."""
    g = torch.Generator().manual_seed(seed)
    return [(tok(f"{100 + 37 * k}+{512 - 41 * k}=")["input_ids"],
             torch.randint(2, len(VOCAB), (7,), generator=g).tolist() + [tok.eos_token_id]) for k in range(num)]


def span_signal(pair, seqs, s_logits, t_lp_of_tokens):
    aligns = [pair.align(p, c) for p, c in seqs]
    packed = pack_alignments(aligns, [len(p) for p, _ in seqs], [len(p) + len(c) for p, c in seqs])
    s_tokens = [i for p, c in seqs for i in p + c]
    t_lp = t_lp_of_tokens(aligns)
    return span_reverse_kl(s_logits, torch.tensor(s_tokens[1:] + [0]), t_lp, student_span=packed.student_row_span,
                           teacher_span=packed.teacher_row_span, num_spans=packed.num_spans), aligns


def test_model_into_itself_through_permuted_ids_gives_zero(toks, tmp_path):
    """The teacher is the student model with its embedding and output rows permuted, read through a
    tokenizer that gives every character the permuted id (and writes EOS another way): the same
    model over the same text, so the exact answer is 0 for every span. Reading the teacher's
    log-probs at the student's ids instead gives a large signal."""
    char = toks["char"]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(VOCAB), generator=g).tolist()  # teacher id t is student id perm[t]
    teacher_tok = permuted_char_tokenizer(tmp_path / "perm", perm)
    student = tiny_lm(tmp_path, len(VOCAB), seed=4)
    teacher = tiny_lm(tmp_path, len(VOCAB), seed=4)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            teacher.get_parameter(name).copy_(student.get_parameter(name)[perm])
    pair = TokenizerPair(char, teacher_tok)
    seqs = arithmetic_sequences(char, num=4, seed=1)
    with torch.no_grad():
        s_logits = torch.cat([student(torch.tensor([p + c])).logits[0] for p, c in seqs])

    def teacher_lp(aligns):
        with torch.no_grad():
            return torch.cat([torch.cat([next_token_logprobs(teacher, a.teacher_ids), torch.zeros(1)]) for a in aligns])

    sig, aligns = span_signal(pair, seqs, s_logits, teacher_lp)
    assert all(a.coverage == 1.0 and a.one_to_one.all() for a in aligns)
    assert sig.valid.all() and sig.log_ratio.abs().max() < 1e-5
    with torch.no_grad():
        naive = torch.cat([(next_token_logprobs(teacher, p + c) - next_token_logprobs(student, p + c))[len(p) - 1:]
                           for p, c in seqs])
    assert naive.abs().max() > 0.5


def test_model_into_itself_through_merged_tokens_gives_zero(toks, tmp_path):
    """The teacher writes the same text in digit pairs, and its probability of a token is the
    student's probability of that token's characters in a row (the student's distribution over text,
    in another tokenization). Span sums of both sides are then the same text's log-probability, so
    the exact answer is 0; a per-position comparison (teacher token k against student token k) is not."""
    char, pair_tok = toks["char"], toks["pair"]
    student = tiny_lm(tmp_path, len(VOCAB) + 2, seed=5)
    pair = TokenizerPair(char, pair_tok)
    seqs = arithmetic_sequences(char, num=4, seed=2)
    with torch.no_grad():
        s_logits = torch.cat([student(torch.tensor([p + c])).logits[0] for p, c in seqs])
        s_lps = [next_token_logprobs(student, p + c)[len(p) - 1:] for p, c in seqs]

    def teacher_lp(aligns):
        rows = []
        for a, lp in zip(aligns, s_lps):
            widths = [len(t) if t != "</s>" else 1
                      for t in pair_tok.convert_ids_to_tokens(a.teacher_ids[a.teacher_prompt_len:])]
            ends = np.cumsum(widths)
            per_token = [lp[e - w:e].sum() for e, w in zip(ends, widths)]
            rows.append(torch.cat([torch.zeros(a.teacher_prompt_len - 1), torch.stack(per_token), torch.zeros(1)]))
        return torch.cat(rows)

    sig, aligns = span_signal(pair, seqs, s_logits, teacher_lp)
    assert all(a.coverage == 1.0 for a in aligns) and any((~a.one_to_one).any() for a in aligns)
    assert sig.valid.all() and sig.log_ratio.abs().max() < 1e-5
    t_lp = teacher_lp(aligns)
    naive = [t_lp[a.teacher_prompt_len - 1 + k] - lp[k] for a, lp in zip(aligns, s_lps)
             for k in range(len(a.teacher_ids) - a.teacher_prompt_len)]
    assert max(abs(float(x)) for x in naive) > 0.5


# ---------------------------------------------------------------- the shared-vocabulary divergence

VS, VT, ROWS, NUM_SHARED = 157, 203, 13, 90
CASES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.5), ("jsd", 0.3, 0.7)]


def problem():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(ROWS, VS, generator=g, dtype=torch.float64) * 3
    t = torch.randn(ROWS, VT, generator=g, dtype=torch.float64) * 3
    s_perm, t_perm = torch.randperm(VS, generator=g), torch.randperm(VT, generator=g)
    s_ids, t_ids = s_perm[:NUM_SHARED], t_perm[:NUM_SHARED]
    # -inf logits (no mass) among the unshared tokens: tails of fewer tokens, never empty.
    s[3, s_perm[NUM_SHARED:NUM_SHARED + 40]] = float("-inf")
    t[7, t_perm[NUM_SHARED:NUM_SHARED + 60]] = float("-inf")
    mask = torch.ones(ROWS)
    mask[5] = 0
    weights = torch.rand(ROWS, generator=g, dtype=torch.float64)
    return s, t, s_ids, t_ids, mask, weights


def shard(z: torch.Tensor, rank: int, width: int) -> torch.Tensor:
    """Rank ``rank``'s columns, padded past the vocabulary with large values that must be ignored."""
    out = torch.full((z.shape[0], width), 50.0, dtype=z.dtype)
    part = z[:, rank * width:(rank + 1) * width]
    out[:, :part.shape[1]] = part
    return out


def reference_shared(s, t, s_ids, t_ids, *, kind, beta, temperature, mask, weights):
    """Unsharded float64: the divergence between the (shared + tail)-bucket coarsenings, and its
    gradient w.r.t. the student's logits; tails floored at the smallest normal float64; without a
    tail when the student shares its whole vocabulary."""
    s = s.detach().clone().requires_grad_()
    log_tiny = math.log(torch.finfo(torch.float64).tiny)

    def buckets(z, ids, temp):
        logp = torch.log_softmax(z / temp, -1)
        rest = torch.ones(z.shape[-1], dtype=torch.bool)
        rest[ids] = False
        if len(s_ids) == s.shape[-1]:  # the student shares its whole vocabulary: no tail, renormalised
            return torch.log_softmax(z[:, ids] / temp, -1)
        return torch.cat([logp[:, ids], torch.logsumexp(logp[:, rest], -1, keepdim=True).clamp_min(log_tiny)], -1)

    d = reference_kind(buckets(s, s_ids, temperature), buckets(t, t_ids, temperature), kind, beta) * mask
    (d * weights).sum().backward()
    return d.detach(), s.grad


def _rel(ours, ref) -> float:
    return float((ours.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def shared_vocab_world() -> dict:
    """On 2 gloo ranks: student TP in {1, 2} x teacher TP in {1, 2}, each kind, fp64 and fp32."""
    rank = dist.get_rank()
    both = dist.new_group([0, 1])
    s, t, s_ids, t_ids, mask, weights = problem()
    errors, collectives = [], []
    for tp_s in (1, 2):
        for tp_t in (1, 2):
            w_s, w_t = -(-VS // tp_s) + 2, -(-VT // tp_t) + 1
            plan = SharedVocab(s_ids, t_ids, student_vocab_size=VS, student_tp=tp_s, student_width=w_s,
                               teacher_vocab_size=VT, teacher_tp=tp_t, teacher_width=w_t)
            s_rank, s_group = (rank, both) if tp_s == 2 else (0, None)
            teacher_ranks = [0, 1] if tp_t == 2 else [0]
            consumers = [[0, 1]] if tp_s == 2 else [[0], [1]]
            for dtype in (torch.float64, torch.float32):
                for kind, beta, temperature in CASES:
                    record = tp_s == tp_t == 2 and dtype == torch.float32 and kind == "reverse_kl"
                    part = None
                    with RecordCollectives() as teacher_calls:
                        if rank in teacher_ranks:
                            part = teacher_shared_logprobs(shard(t, teacher_ranks.index(rank), w_t).to(dtype), plan,
                                                           tp_group=both if tp_t == 2 else None,
                                                           temperature=temperature, chunk_size=5)
                    got = [route_shared_logprobs(part, plan, teacher_ranks=teacher_ranks, student_ranks=c,
                                                 num_rows=ROWS, dtype=dtype, device=torch.device("cpu"))
                           for c in consumers]
                    logq, tail = next(g for g in got if g is not None)
                    x = shard(s, s_rank, w_s).to(dtype).requires_grad_()
                    with RecordCollectives() as fwd:
                        out = shared_vocab_divergence(x, logq, tail, plan, kind=kind, beta=beta,
                                                      temperature=temperature, loss_mask=mask, tp_group=s_group,
                                                      chunk_size=5)
                    with RecordCollectives() as bwd:
                        (out * weights.to(dtype)).sum().backward()
                    ref, ref_grad = reference_shared(s, t, s_ids, t_ids, kind=kind, beta=beta,
                                                     temperature=temperature, mask=mask, weights=weights)
                    ref_grad = shard(ref_grad, s_rank, w_s)
                    ref_grad[:, max(0, VS - s_rank * w_s):] = 0  # padding gets no gradient
                    errors.append((f"tp_s={tp_s} tp_t={tp_t} {dtype} {kind}", _rel(out, ref),
                                   _rel(x.grad, ref_grad), str(dtype)))
                    if record:
                        collectives = [teacher_calls.calls, fwd.calls, bwd.calls]
    # A student vocabulary shared whole (no student tail), at student TP 2, teacher TP 1 (finite
    # logits: a shared token without mass on one side makes a KL infinite).
    s, t = s.clamp_min(-20.0), t.clamp_min(-20.0)
    plan = SharedVocab(torch.arange(VS), torch.randperm(VT, generator=torch.Generator().manual_seed(1))[:VS],
                       student_vocab_size=VS, student_tp=2, student_width=79, teacher_vocab_size=VT, teacher_tp=1,
                       teacher_width=VT)
    part = teacher_shared_logprobs(t, plan) if rank == 0 else None
    logq, tail = route_shared_logprobs(part, plan, teacher_ranks=[0], student_ranks=[0, 1], num_rows=ROWS,
                                       dtype=torch.float64, device=torch.device("cpu"))
    for kind in ("forward_kl", "reverse_kl"):
        x = shard(s, rank, 79).requires_grad_()
        out = shared_vocab_divergence(x, logq, tail, plan, kind=kind, loss_mask=mask, tp_group=both)
        (out * weights).sum().backward()
        ref, ref_grad = reference_shared(s, t, plan.student_ids, torch.as_tensor(plan.teacher_ids), kind=kind,
                                         beta=0.5, temperature=1.0, mask=mask, weights=weights)
        ref_grad = shard(ref_grad, rank, 79)
        ref_grad[:, max(0, VS - rank * 79):] = 0
        errors.append((f"whole student vocabulary {kind}", _rel(out, ref), _rel(x.grad, ref_grad), "torch.float64"))
    return {"errors": errors, "collectives": collectives, "span": span_world(both)}


def span_world(group) -> float:
    """The span signal at TP 2 against the same at TP 1: loss, advantage and gradient."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(17, VS, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VS, (17,), generator=g)
    s_span = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 2, -1, 3, 4, 4, 5, -1, -1, 6, 6])
    t_span = torch.tensor([-1, 0, 1, 2, 2, -1, 3, 4, 5, 6, -1])
    t_lp = -torch.rand(11, generator=g, dtype=torch.float64) * 4
    mask = torch.ones(17)
    mask[12] = 0
    outs = []
    for tp, grp in ((1, None), (2, group)):
        width = -(-VS // tp)
        x = shard(z, rank if tp == 2 else 0, width).requires_grad_()
        sig = span_reverse_kl(x, targets, t_lp, student_span=s_span, teacher_span=t_span, num_spans=7,
                              loss_mask=mask, vocab_size=VS, tp_group=grp, chunk_size=4)
        sig.loss.sum().backward()
        grad = x.grad
        if tp == 2:
            parts = [torch.empty_like(grad) for _ in range(2)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, -1)
        outs.append((sig.loss.detach(), sig.advantage, grad[:, :VS], sig.valid))
    (l1, a1, g1, v1), (l2, a2, g2, v2) = outs
    assert v1.tolist() == v2.tolist() == [True] * 5 + [False, True]  # span 5 has an untrained token
    return max(float((l1 - l2).abs().max()), float((a1 - a2).abs().max()), float((g1 - g2).abs().max()))


@pytest.fixture(scope="module")
def world_results():
    return run_distributed(shared_vocab_world, 2, timeout=240)


def test_shared_vocab_divergence_matches_float64_reference(world_results):
    """Student TP 1/2 x teacher TP 1/2 (vocabularies 157 and 203, not divisible by TP, padded wider
    still), forward KL, reverse KL, JSD, temperatures, a masked row, -inf logits, a vocabulary
    shared whole: value and gradient of the student's shard."""
    for rank, res in enumerate(world_results):
        for name, err_v, err_g, dtype in res["errors"]:
            tol = 1e-12 if dtype == "torch.float64" else 2e-5
            assert err_v <= tol and err_g <= tol, f"rank {rank} {name}: value {err_v:.1e}, gradient {err_g:.1e}"


def test_shared_vocab_collectives_are_the_documented_ones(world_results):
    """Teacher: one all_gather of [chunk, 4] per chunk. Student forward: one all_gather of [chunk, 4] and
    one all_reduce of [chunk, 1]; backward: none (13 rows in chunks of 5)."""
    teacher, fwd, bwd = world_results[0]["collectives"]
    chunks = [5, 5, 3]
    assert teacher == [("all_gather_single", (2 * c, 4)) for c in chunks]
    assert fwd == [x for c in chunks for x in (("all_gather_single", (2 * c, 4)), ("all_reduce", (c, 1)))]
    assert bwd == []


def test_span_signal_tp2_equals_tp1(world_results):
    assert max(r["span"] for r in world_results) < 1e-12


def test_errors_name_the_argument():
    s, t, s_ids, t_ids, mask, _ = problem()
    kw = dict(student_vocab_size=VS, student_tp=1, student_width=VS, teacher_vocab_size=VT, teacher_tp=1,
              teacher_width=VT)
    with pytest.raises(ValueError, match=r"teacher shared ids must lie in \[0, teacher_vocab_size=203\)"):
        SharedVocab(s_ids, t_ids + 200, **kw)
    with pytest.raises(ValueError, match="student shared ids repeat"):
        SharedVocab(torch.zeros(3, dtype=torch.long), t_ids[:3], **kw)
    with pytest.raises(ValueError, match=r"student: tp \* width = 2 \* 70 < vocab_size 157"):
        SharedVocab(s_ids, t_ids, **{**kw, "student_tp": 2, "student_width": 70})
    plan = SharedVocab(s_ids, t_ids, **kw)
    logq, tail = teacher_shared_logprobs(t, plan)
    with pytest.raises(ValueError, match=r"teacher_logprobs must be \[N, shared columns of this rank\]"):
        shared_vocab_divergence(s, logq[:, :5], tail, plan, kind="forward_kl")
    with pytest.raises(ValueError, match="columns per rank, vocab_size = 1, 210, 203, but the shared-vocabulary "
                                         "plan was built for 1, 203, 203"):
        teacher_shared_logprobs(shard(t, 0, 210), plan)
    with pytest.raises(ValueError, match=r"student_span must lie in \[-1, num_spans=2\)"):
        span_reverse_kl(s, torch.zeros(ROWS, dtype=torch.long), torch.zeros(4),
                        student_span=torch.full((ROWS,), 2), teacher_span=torch.zeros(4, dtype=torch.long),
                        num_spans=2)
    with pytest.raises(ValueError, match=r"teacher_span must have shape \(4,\)"):
        span_reverse_kl(s, torch.zeros(ROWS, dtype=torch.long), torch.zeros(4),
                        student_span=torch.zeros(ROWS, dtype=torch.long), teacher_span=torch.zeros(3, dtype=torch.long),
                        num_spans=2)
