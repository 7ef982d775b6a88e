"""Core attention for megatron-core's local layer spec that honours packed (THD) sequences.

megatron-core's local ``DotProductAttention`` refuses ``packed_seq_params`` and builds an
``[s, s]`` score matrix per head, so a pack of sequences needed a dense ``[L, L]`` block-causal
mask (O(L^2) memory, and ignored altogether under a sliding window). This module fills the same
``core_attention`` slot of ``SelfAttention``:

- THD (``packed_seq_params.qkv_format == "thd"``, query ``[t, heads, d]``): causal attention
  within each sequence of ``cu_seqlens``, one ``scaled_dot_product_attention`` call per sequence,
  so memory is that of the longest sequence (O(s_i) with the fused kernels CPU and CUDA pick here,
  O(s_i^2) at worst), never O(t^2);
- SBHD (query ``[s, b, heads, d]``, no packing): causal attention per row, or the given megatron
  mask (``True`` = blocked), in one call.

GQA without repeating keys and values (``enable_gqa``), Mistral's sliding window (megatron's
``window_size = (w - 1, 0)``: query i sees keys j with i - w < j <= i), softmax in fp32 for
bf16/fp16 inputs (the SDPA kernels accumulate in fp32). The attention itself is plain torch
(:mod:`megatron_opd.models.varlen`, importable without megatron-core). On GPU with Transformer
Engine the layer spec uses ``TEDotProductAttention`` in THD format instead.
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_opd.models.varlen import sdpa, varlen_attention, window_mask


def _window_of_layer(config, layer_number: int) -> int | None:
    """The HF sliding window (keys i - w < j <= i) of this layer, from megatron's ``window_size``."""
    if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        return None
    left, right = config.window_size
    if right != 0 or left < 0:
        raise ValueError(f"window_size={config.window_size}: only causal sliding windows "
                         "(left, 0) with left >= 0 are supported")
    return left + 1


class VarlenAttention(MegatronModule):
    """The ``core_attention`` submodule of megatron's ``SelfAttention`` (same constructor and
    forward signature as ``DotProductAttention``), for packed THD micro-batches and plain ones.

    Query ``[t, heads/TP, d]`` in THD format (megatron squeezes the batch dimension of 1), else
    ``[s, b, heads/TP, d]``; keys/values with ``groups/TP`` heads. Returns ``[t, heads/TP * d]``
    (THD) or ``[s, b, heads/TP * d]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size}: VarlenAttention "
                             "has no context parallelism (use Transformer Engine's attention)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by VarlenAttention")
        if attention_type != "self":
            raise ValueError(f"attention_type={attention_type!r}: VarlenAttention is self-attention only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies the fp32 scores back by it: the net scale is the plain one.
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = _window_of_layer(config, self.layer_number)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("VarlenAttention does not take an attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={mask_type}: VarlenAttention is causal attention only")
        dropout_p = self.dropout_p if self.training else 0.0
        forks = dropout_p and not self.config.sequence_parallel  # as megatron's DotProductAttention
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if forks else contextlib.nullcontext()
        with rng:
            if packed_seq_params is not None:
                return self._forward_thd(query, key, value, attention_mask, packed_seq_params, dropout_p)
            return self._forward_sbhd(query, key, value, attention_mask, dropout_p)

    def _forward_thd(self, query, key, value, attention_mask, params, dropout_p):
        if params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format={params.qkv_format!r}: only 'thd' is supported")
        if attention_mask is not None:
            raise ValueError("packed (THD) attention takes cu_seqlens, not an attention_mask")
        if query.dim() != 3:
            raise ValueError(f"THD query must be [tokens, heads, head_dim], got {tuple(query.shape)}")
        cu_q = params.cu_seqlens_q.tolist()
        if params.cu_seqlens_kv is not None and params.cu_seqlens_kv.tolist() != cu_q:
            raise ValueError("VarlenAttention is self-attention: cu_seqlens_kv must equal cu_seqlens_q")
        padded = params.cu_seqlens_q_padded
        padded = padded.tolist() if padded is not None else None
        if padded == cu_q:
            padded = None
        bounds = padded or cu_q
        lengths = [b - a for a, b in zip(cu_q, cu_q[1:])]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if (cu_q[0] != 0 or bounds[0] != 0 or bounds[-1] != query.shape[0] or len(sizes) != len(lengths)
                or any(n < 0 or size < n for n, size in zip(lengths, sizes))):
            raise ValueError(f"cu_seqlens {cu_q} (padded {padded}) must start at 0, not decrease, fit "
                             f"their padded bounds and end at the {query.shape[0]} packed tokens")
        ctx = varlen_attention(query, key, value, cu_q, scale=self.softmax_scale, window=self.window,
                               cu_seqlens_padded=padded, dropout_p=dropout_p)
        return ctx.reshape(ctx.shape[0], -1)

    def _forward_sbhd(self, query, key, value, attention_mask, dropout_p):
        s, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        mask = None
        if attention_mask is not None:
            # megatron's mask: [b or 1, 1, s, s], True where attention is blocked. Under a window
            # it is combined with the window (megatron's own softmax would drop it).
            mask = ~attention_mask
            if self.window is not None:
                mask = mask & window_mask(s, self.window, mask.device)
        ctx = sdpa(q, k, v, scale=self.softmax_scale, window=self.window, mask=mask, dropout_p=dropout_p)
        return ctx.permute(2, 0, 1, 3).reshape(s, b, -1)
