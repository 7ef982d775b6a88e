"""Packed (THD) core attention against a float64 dense-mask reference: values and q/k/v gradients."""

import math

import pytest
import torch

from megatron_opd.models.varlen import varlen_attention

HEADS, GROUPS, HEAD_DIM = 4, 2, 32


def _reference(q, k, v, lengths, window=None, padded=None):
    """float64 attention over ``[t, heads, d]`` with a dense ``[t, t]`` mask: causal within each
    sequence (and i - window < j), nothing across; padding rows (``padded`` bounds) give 0."""
    q, k, v = (x.double() for x in (q, k, v))
    t = q.shape[0]
    bounds = padded or [0] + torch.tensor(lengths).cumsum(0).tolist()
    seq = torch.full((t,), -1)
    pos = torch.zeros(t, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq[bounds[i]:bounds[i] + n] = i
        pos[bounds[i]:bounds[i] + n] = torch.arange(n)
    allowed = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", probs, v)


def _inputs(t, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, HEADS, HEAD_DIM, generator=g) * 1.5
    k = torch.randn(t, GROUPS, HEAD_DIM, generator=g) * 1.5
    v = torch.randn(t, GROUPS, HEAD_DIM, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _cu(lengths):
    return [0] + torch.tensor(lengths).cumsum(0).tolist()


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return torch.autograd.grad((out.double() * upstream).sum(), inputs)


CASES = {
    "unequal_with_length_1": ([7, 1, 19, 12, 1, 5], None),
    "one_fills_the_pack": ([45], None),
    "window": ([7, 1, 19, 12, 1, 5], 6),
    "window_fills_the_pack": ([45], 6),
}


@pytest.mark.parametrize("case", CASES)
def test_varlen_attention_matches_float64_dense_reference(case):

    lengths, window = CASES[case]
    inputs = _inputs(sum(lengths))
    out = varlen_attention(*inputs, _cu(lengths), scale=HEAD_DIM ** -0.5, window=window)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = _reference(*ref_inputs, lengths, window)
    assert out.shape == (sum(lengths), HEADS, HEAD_DIM)
    assert (out.double() - ref).abs().max() < 2e-6
    for got, want in zip(_grads(out, inputs), _grads(ref, ref_inputs)):
        assert (got.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


def test_varlen_attention_padded_sequences_and_empty_ones():

    lengths = [5, 0, 1, 9]
    padded = [0, 8, 8, 12, 21]  # each sequence padded to a multiple of 4, the last one not at all
    inputs = _inputs(21)
    out = varlen_attention(*inputs, _cu(lengths), scale=HEAD_DIM ** -0.5, cu_seqlens_padded=padded)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = _reference(*ref_inputs, lengths, padded=padded)
    assert (out.double() - ref).abs().max() < 2e-6
    assert out[5:8].abs().max() == 0 and out[9:12].abs().max() == 0
    for got, want in zip(_grads(out, inputs), _grads(ref, ref_inputs)):
        assert (got.double() - want).abs().max() < 1e-5


def test_bf16_inputs_get_an_fp32_softmax():
    """bf16 q/k/v: the output is the float64 result up to the bf16 rounding of the output itself.
    A bf16 softmax (scores and probabilities rounded to bf16) is measurably worse, so the check
    can fail."""

    lengths = [40, 1, 87]
    window = 50
    inputs = _inputs(sum(lengths), dtype=torch.bfloat16, seed=3)
    out = varlen_attention(*inputs, _cu(lengths), scale=HEAD_DIM ** -0.5, window=window)
    assert out.dtype == torch.bfloat16
    ref = _reference(*[x.detach() for x in inputs], lengths, window)
    rounding = (ref.bfloat16().double() - ref).abs()
    err = (out.double() - ref).abs()
    assert err.max() <= 2 * rounding.max() and err.mean() <= 1.3 * rounding.mean(), (err, rounding)
    q, k, v = (x.detach().float() for x in inputs)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    bf16_softmax = []
    for a, b in zip(_cu(lengths), _cu(lengths)[1:]):
        scores = (torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * HEAD_DIM ** -0.5).bfloat16().float()
        i = torch.arange(b - a)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).bfloat16().float()
        bf16_softmax.append(torch.einsum("hij,jhd->ihd", probs, v[a:b]).bfloat16())
    assert (torch.cat(bf16_softmax).double() - ref).abs().mean() > 2 * rounding.mean()
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    for got, want in zip(_grads(out, inputs), _grads(_reference(*ref_inputs, lengths, window), ref_inputs)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() < 0.01 * want.abs().max()


def _config(window=None, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=96, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=HEAD_DIM, window_size=window,
                             use_cpu_initialization=True, attention_dropout=0.0, **extra)


def _module(config, layer_number=1):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opd.models.attention import VarlenAttention

    return VarlenAttention(config, layer_number, AttnMaskType.causal, "self")


def test_module_thd_and_sbhd_match_the_reference():
    """The core-attention slot as megatron's SelfAttention calls it: THD with packed_seq_params
    (megatron's window_size (w - 1, 0) is HF's sliding window w), and unpacked [s, b] rows."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [7, 1, 19, 12]
    cu = torch.tensor(_cu(lengths), dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    for window in (None, 6):
        module = _module(_config(window=None if window is None else (window - 1, 0)))
        inputs = _inputs(sum(lengths), seed=5)
        out = module(*inputs, None, packed_seq_params=params)
        assert out.shape == (sum(lengths), HEADS * HEAD_DIM)
        ref = _reference(*inputs, lengths, window).reshape(sum(lengths), -1)
        assert (out.double() - ref).abs().max() < 2e-6
        # unpacked: [s, b, heads, d], two rows of 19 tokens
        q, k, v = (x.detach()[:38].view(2, 19, *x.shape[1:]).transpose(0, 1) for x in inputs)
        out = module(q, k, v, None)
        assert out.shape == (19, 2, HEADS * HEAD_DIM)
        for row in range(2):
            ref = _reference(q[:, row], k[:, row], v[:, row], [19], window)
            assert (out[:, row].double() - ref.reshape(19, -1)).abs().max() < 2e-6


def test_module_refuses_what_it_cannot_do():
    from megatron.core.packed_seq_params import PackedSeqParams

    module = _module(_config())
    q, k, v = _inputs(10)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5,
                             max_seqlen_kv=5)
    with pytest.raises(ValueError, match=r"end at the 10 packed tokens"):
        module(q, k, v, None, packed_seq_params=params)
    short = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5,
                            max_seqlen_kv=5, cu_seqlens_q_padded=torch.tensor([0, 3, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="fit their padded bounds"):
        module(q, k, v, None, packed_seq_params=short)
    with pytest.raises(ValueError, match="qkv_format='sbhd'"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    with pytest.raises(ValueError, match="context_parallel_size=2"):
        _module(_config(context_parallel_size=2))
