"""Vocab-parallel, token-chunked losses: divergences, log-probs of token ids, top-k; on logits or fused
with the output layer (hidden states and weight shards in, no logits kept)."""

from megatron_opd.losses.divergence import sampled_token_reverse_kl, vocab_parallel_divergence
from megatron_opd.losses.fused_linear import (fused_linear_divergence, fused_linear_divergence_sum,
                                              fused_linear_token_logprobs, fused_linear_topk_logprobs)
from megatron_opd.losses.logprobs import token_logprobs, topk_logprobs

__all__ = ["fused_linear_divergence", "fused_linear_divergence_sum", "fused_linear_token_logprobs",
           "fused_linear_topk_logprobs", "sampled_token_reverse_kl", "token_logprobs", "topk_logprobs",
           "vocab_parallel_divergence"]
