"""Vocab-parallel, token-chunked losses: divergences, log-probs of token ids, top-k."""

from megatron_opd.losses.logprobs import token_logprobs, topk_logprobs

__all__ = ["token_logprobs", "topk_logprobs"]
