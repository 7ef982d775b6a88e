"""HF config.json -> a validated architecture description -> megatron-core ``TransformerConfig``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_opd import parallel
from megatron_opd.models.families import FAMILIES
from megatron_opd.models.family import Family

# Vocabulary rows are padded to a multiple of this times TP (megatron's convention), so every TP
# rank holds an equal shard and the GEMM sizes stay friendly.
VOCAB_PAD_MULTIPLE = 128

# Parameter dtypes a model can be built in (``student.dtype``, ``teacher.dtype``). bf16 is megatron's
# mixed precision: bf16 parameters and activations, fp32 main parameters in the optimizer, gradients
# accumulated and reduced in fp32.
PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def params_dtype(name: str, *, what: str = "model.dtype") -> torch.dtype:
    """The torch dtype of a ``PARAMS_DTYPES`` name; a ValueError naming ``what`` otherwise."""
    if name not in PARAMS_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(PARAMS_DTYPES)}, got {name!r}")
    return PARAMS_DTYPES[name]


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


@dataclass(frozen=True)
class ArchConfig:
    """Everything about a model's architecture that megatron_opd uses, resolved from an HF config.

    ``hf_config`` keeps the original config.json content so exports write it back unchanged.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    rope_scaling: dict
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    hf_config: dict = field(repr=False, compare=False, default_factory=dict)
    # Mixture of experts (families with a ``moe`` entry); 0 for dense models.
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_renormalize: bool = True  # the top-k probabilities renormalised to sum to one

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ArchConfig":
        return cls(**data)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ArchConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{config_file}: no config.json (is {path} an HF model directory?)")
        try:
            data = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        return cls.from_hf_config(data, source=str(config_file))

    @classmethod
    def from_hf_config(cls, data: dict, *, source: str = "config") -> "ArchConfig":
        """Validate an HF config dict (as in config.json) and resolve it."""
        if hasattr(data, "to_dict"):
            data = data.to_dict()
        model_type = data.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(FAMILIES))})")
        family = FAMILIES[model_type]

        def need(key, kind=int):
            if key not in data or data[key] is None:
                raise ValueError(f"{source}: missing field {key!r}")
            value = data[key]
            if kind is int and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value

        for key, expected in family.required_values.items():
            if data.get(key, expected) != expected:
                raise ValueError(f"{source}: {key}={data[key]!r} is not supported for "
                                 f"{model_type} (only {expected!r})")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = data.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        head_dim = data.get("head_dim") or hidden // heads
        rope_type, theta, scaling = _rope(data, source)
        sliding_window = None
        if family.sliding_window and data.get("sliding_window") is not None:
            sliding_window = int(data["sliding_window"])
        for key in ("attention_dropout", "hidden_dropout"):
            if data.get(key, 0.0):
                raise ValueError(f"{source}: {key}={data[key]} is not supported (only 0.0)")
        moe = {}
        if family.moe is not None:
            key = next((k for k in family.moe.num_experts_keys if data.get(k) is not None),
                       family.moe.num_experts_keys[0])
            num_experts = need(key)
            top_k = need(family.moe.top_k_key)
            if top_k > num_experts:
                raise ValueError(f"{source}: {family.moe.top_k_key}={top_k} exceeds {key}={num_experts}")
            renormalize = True
            if family.moe.renormalize_key is not None:
                renormalize = bool(data.get(family.moe.renormalize_key, False))
            moe = dict(num_experts=num_experts, moe_top_k=top_k,
                       moe_ffn_hidden_size=need(family.moe.expert_ffn_key), moe_renormalize=renormalize)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=scaling,
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            max_position_embeddings=int(data.get("max_position_embeddings", 4096)),
            sliding_window=sliding_window,
            hf_config=dict(data),
            **moe,
        )

    def check_parallel(self, *, tp: int, pp: int, ep: int = 1, etp: int | None = None,
                       what: str = "model") -> None:
        """Raise a ValueError naming the field if this model cannot be split as asked (``etp``:
        expert tensor parallel, ``None`` for ``tp``)."""
        for name, count in (("num_attention_heads", self.num_attention_heads),
                            ("num_key_value_heads", self.num_kv_heads)):
            if count % tp:
                raise ValueError(f"{what}: {name}={count} is not divisible by tp={tp}")
        if self.num_layers % pp:
            raise ValueError(f"{what}: num_hidden_layers={self.num_layers} is not divisible by "
                             f"pp={pp}")
        if not self.is_moe:
            if self.ffn_hidden_size % tp:
                raise ValueError(f"{what}: intermediate_size={self.ffn_hidden_size} is not divisible "
                                 f"by tp={tp}")
            if ep != 1:
                raise ValueError(f"{what}: ep={ep} needs a mixture-of-experts model; {self.model_type} "
                                 "is dense (use ep=1)")
            return
        etp = tp if etp is None else etp
        experts_key = self.family.moe.num_experts_keys[0]
        if self.num_experts % ep:
            raise ValueError(f"{what}: {experts_key}={self.num_experts} is not divisible by ep={ep}")
        if self.moe_ffn_hidden_size % etp:
            raise ValueError(f"{what}: {self.family.moe.expert_ffn_key}={self.moe_ffn_hidden_size} is not "
                             f"divisible by the expert tensor-parallel size {etp}")


def _rope(data: dict, source: str) -> tuple[str, float, dict]:
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope_parameters.rope_type={rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    if data.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={data['partial_rotary_factor']} is not "
                         "supported (only 1.0)")
    return rope_type, theta, scaling


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them for this config."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return ROPE_TYPES[arch.rope_type](inv_freq, arch.rope_scaling)


def _rope_default(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    return inv_freq


def _rope_linear(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    return inv_freq / float(scaling["factor"])


def _rope_llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


ROPE_TYPES = {"default": _rope_default, "linear": _rope_linear, "llama3": _rope_llama3}


def transformer_config(arch: ArchConfig, *, tp: int, pp: int, params_dtype: torch.dtype,
                       ep: int = 1, etp: int | None = None, moe_aux_loss_coeff: float = 0.0,
                       sequence_parallel: bool = False, recompute: bool = False,
                       initialize: bool = True, init_method_std: float = 0.02,
                       extra: dict | None = None):
    """The megatron-core ``TransformerConfig`` for ``arch`` split ``tp`` x ``pp`` ways (experts
    ``ep`` ways, each split ``etp`` ways; ``None``: ``tp``).

    ``params_dtype`` is fp32 or bf16 (:data:`PARAMS_DTYPES`), on GPUs and CPUs alike (bf16 on CPU
    goes through the shims of :mod:`megatron_opd.cpu_compat`). ``batch_p2p_comm`` is always off on
    CPU: with gloo it silently produces wrong gradients under interleaved pipelines.
    ``moe_aux_loss_coeff`` > 0 adds megatron's load-balancing loss (off by default: a distilled
    student follows its teacher's routing, not a balance target).
    """
    from megatron.core.transformer import TransformerConfig

    arch.check_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    if moe_aux_loss_coeff < 0 or (moe_aux_loss_coeff and not arch.is_moe):
        raise ValueError(f"moe_aux_loss_coeff={moe_aux_loss_coeff}: must be >= 0, and 0 for a dense model")
    if params_dtype not in PARAMS_DTYPES.values():
        raise ValueError(f"params_dtype={params_dtype} is not supported (supported: "
                         f"{', '.join(f'{k} ({v})' for k, v in PARAMS_DTYPES.items())})")
    on_gpu = parallel.cuda_available()
    window = None
    if arch.sliding_window is not None and arch.sliding_window < arch.max_position_embeddings:
        # HF: query i sees keys j with i - sliding_window < j <= i.
        window = (arch.sliding_window - 1, 0)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.family.qkv_bias,
        qk_layernorm=arch.family.qk_norm,
        window_size=window,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        perform_initialization=initialize,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # megatron rejects the default with the line above
        cuda_graph_scope=[],
        batch_p2p_comm=on_gpu,
        # Fused kernels need apex/TE CUDA builds; the unfused paths are exact everywhere.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
    if arch.is_moe:
        kwargs.update(moe_kwargs(arch, ep=ep, etp=etp, aux_loss_coeff=moe_aux_loss_coeff))
    kwargs.update(extra or {})
    return TransformerConfig(**kwargs)


def moe_kwargs(arch: ArchConfig, *, ep: int, etp: int | None, aux_loss_coeff: float) -> dict:
    """megatron's MoE layer set up to route as transformers does.

    HF: ``p = softmax(logits in fp32)``, the top-k of ``p``, divided by their sum when
    renormalising. megatron with ``moe_router_pre_softmax=False`` takes the top-k logits and
    softmaxes them, which is the same distribution (softmax is monotone, and the renormalised
    top-k of a softmax is the softmax of the top-k logits); without renormalisation
    ``pre_softmax=True`` keeps the top-k of the full softmax. The router's gemm and softmax run in
    fp32 (``moe_router_dtype``). Dropless (no capacity factor), no shared expert, no expert bias,
    SequentialMLP experts (one SwiGLU MLP per expert: the table's per-expert rows).
    """
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_top_k,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_pre_softmax=not arch.moe_renormalize,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_shared_expert_intermediate_size=None,
        moe_expert_capacity_factor=None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
