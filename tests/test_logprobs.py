"""token_logprobs, topk_logprobs, sampled_token_reverse_kl in one process (sharded: test_divergence)."""

import pytest
import torch

from megatron_opd.losses import sampled_token_reverse_kl, token_logprobs, topk_logprobs


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


def test_token_logprobs_of_a_sliced_batch_match_log_softmax():
    """The scoring call: logits[:, :-1] (not contiguous) against ids[:, 1:], padded vocabulary."""
    logits = _logits(2, 9, 40)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x[:, :-1], ids[:, 1:], vocab_size=37, temperature=0.8, chunk_size=4)
    ref_in = logits.double().requires_grad_()
    ref = torch.log_softmax(ref_in[:, :-1, :37] / 0.8, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp.sum().backward()
    ref.sum().backward()
    assert lp.shape == (2, 8) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-6)
    assert (x.grad[..., 37:] == 0).all() and (x.grad[:, -1] == 0).all()


def test_token_logprobs_gradcheck_float64():
    x = _logits(6, 13, dtype=torch.float64).requires_grad_()
    ids = torch.tensor([0, 3, 10, 10, 7, 1])
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, ids, vocab_size=11, temperature=0.6, chunk_size=4), (x,))


def test_bf16_logits_give_fp32_logprobs_and_a_bf16_gradient():
    x = _logits(5, 20).bfloat16().requires_grad_()
    ids = torch.arange(5)
    lp = token_logprobs(x, ids)
    lp.sum().backward()
    ref = torch.log_softmax(x.detach().double(), -1)[torch.arange(5), ids]
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-5)


def test_topk_logprobs_best_first_and_padded_columns_never_chosen():
    logits = _logits(4, 3, 30)
    logits[..., 25:] = 100.0  # padding must not be picked
    ids, lps = topk_logprobs(logits, 6, vocab_size=25, temperature=2.0, chunk_size=5)
    ref_lp, ref_ids = torch.log_softmax(logits[..., :25].double() / 2.0, -1).topk(6, dim=-1)
    assert ids.shape == (4, 3, 6) and torch.equal(ids, ref_ids)
    torch.testing.assert_close(lps.double(), ref_lp, rtol=1e-6, atol=1e-5)


def test_sampled_token_reverse_kl_is_logprob_difference_and_ignores_masked_ids():
    logits = _logits(3, 12, 50)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) > 0.4
    teacher_lp = -torch.rand(3, 12, generator=torch.Generator().manual_seed(4)) * 5
    x = logits.clone().requires_grad_()
    kl = sampled_token_reverse_kl(x, torch.where(mask, ids, -100), teacher_lp, loss_mask=mask, chunk_size=7)
    kl.sum().backward()
    lp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(kl.double(), torch.where(mask, lp - teacher_lp, 0.0), rtol=1e-6, atol=1e-5)
    assert (x.grad[~mask] == 0).all() and (x.grad[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("call,message", [
    (lambda x: token_logprobs(x, torch.tensor([0, 40]), vocab_size=37),
     r"token_ids must lie in \[0, vocab_size=37\)"),
    (lambda x: token_logprobs(x, torch.tensor([0, 1, 2])), "token_ids shape"),
    (lambda x: token_logprobs(x, torch.tensor([0, 1]), temperature=-1.0), "temperature must be a positive"),
    (lambda x: topk_logprobs(x, 41), r"k must be an integer in \[1, vocab_size=40\]"),
    (lambda x: sampled_token_reverse_kl(x, torch.tensor([0, 1]), torch.zeros(3)), "must have the student's"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(_logits(2, 40))
