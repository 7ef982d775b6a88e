"""Vocab-parallel, token-chunked losses: divergences, log-probs of token ids, top-k."""

from megatron_opd.losses.divergence import sampled_token_reverse_kl, vocab_parallel_divergence
from megatron_opd.losses.logprobs import token_logprobs, topk_logprobs

__all__ = ["sampled_token_reverse_kl", "token_logprobs", "topk_logprobs", "vocab_parallel_divergence"]
