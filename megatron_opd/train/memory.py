"""Per-GPU memory estimate of a run's layout, for `megatron-opd train --dry-run --world-size N`.

A planning estimate, not a measurement: parameter and optimizer bytes are exact for the layout and
the models' dtypes (``student.dtype``, ``teacher.dtype``: fp32, or bf16 with fp32 main parameters
in the optimizer; gradients are reduced in fp32 either way);
activations count what a decoder layer keeps for its backward (:func:`layer_activation_bytes`, for
the micro-batches a 1F1B pipeline keeps in flight): linear in the tokens of a packed micro-batch,
which is a THD pack with no [L, L] mask (attention per sequence); attention scores come on top only
where a sequence's attention runs torch's math kernel (:func:`attention_score_bytes`), and then per
sequence, bounded by the longest sequence, never by the pack. Logits count the student's shard, its
gradient and the chunked loss's temporaries (the teacher's shard waits on the CPU between phases).
The constants were fitted to the dry run's rehearsal of the real step on fake tensors
(``train/rehearsal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opd.models.config import ArchConfig, padded_vocab_size, params_dtype
from megatron_opd.teacher.signals import Need

GiB = 1 << 30
# Attention runs once per sequence of a THD pack (models/varlen.py). A causal bf16/fp16 sequence
# runs flash attention on CUDA (O(L): output and log-sum-exp); a sequence longer than a sliding
# window (which takes a mask) or an fp32 model runs torch's math kernel, which keeps fp32 scores
# [heads/TP, s, s] of every sequence and layer for the backward, and about twice one sequence's
# while it runs (bytes per score element, as the dry run's rehearsal measured on torch's kernels:
# the fp32 softmax plus the mask's share).
MATH_ATTENTION_KEPT = 4.75
MATH_ATTENTION_PEAK = 9.5


def layer_activation_bytes(arch: ArchConfig, *, tp: int, bpe: int) -> float:
    """Bytes a decoder layer keeps per token for its backward (megatron's local spec, no sequence
    parallelism, THD packs): h-wide tensors that every TP rank holds whole (the inputs of both
    norms and of the QKV and FC1 linears, the torch norms' fp32 intermediates), the TP shards of
    q/k/v and the attention's output, and the MLP's f-wide shards (FC1's gate/up, the activation,
    their product). The h- and f-wide counts (10.5 and 5.3 values of the parameter dtype) are fitted
    to the dry run's rehearsal of Qwen2.5-1.5B at TP2 and Llama-3.1-8B at TP8 on 16384-token packs.
    Attention scores come on top where the math kernel runs (:func:`attention_score_bytes`)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return bpe * (10.5 * h + (2 * q + 2 * kv) / tp + 5.3 * f / tp)


def runs_math_attention(arch: ArchConfig, dtype_name: str, longest: int) -> bool:
    """Whether a sequence of up to ``longest`` tokens runs attention with torch's math kernel (fp32
    scores) rather than flash attention: a mask (the sliding window is shorter than the sequence),
    a dtype flash attention does not take, or a head too wide for it."""
    windowed = arch.sliding_window is not None and longest > arch.sliding_window
    return windowed or bytes_per_parameter(dtype_name) != 2 or arch.head_dim > 256


def attention_score_bytes(arch: ArchConfig, *, tp: int, lengths: list[int], per_element: float) -> float:
    """Score bytes of one layer's math-kernel attention over sequences of ``lengths`` tokens."""
    return per_element * arch.num_attention_heads / tp * sum(n * n for n in lengths)


def worst_pack(tokens: int, longest: int) -> list[int]:
    """Sequence lengths of the micro-batch with the most attention work: sequences of the longest
    shape filling ``tokens`` (``data.micro_batch_tokens``), or one longer sequence alone."""
    if longest >= tokens:
        return [longest]
    return [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])


def expert_parameter_count(arch: ArchConfig, *, pp: int, ep: int = 1, etp: int = 1) -> int:
    """Expert parameters held by one rank of a pipeline stage: its ``num_experts / ep`` experts,
    each split ``etp`` ways (0 for a dense model)."""
    per_expert = 3 * arch.hidden_size * arch.moe_ffn_hidden_size // etp
    return arch.num_experts // ep * per_expert * (arch.num_layers // pp)


def parameter_count(arch: ArchConfig, *, tp: int, pp: int, stage: int, ep: int = 1,
                    etp: int | None = None) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (after TP splitting; experts after
    EP and expert-TP splitting, ``etp`` None: ``tp``)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    mlp = 0 if arch.is_moe else 3 * h * f  # a mixture of experts: the router (replicated) instead
    layer = (h * (q + 2 * kv) + (q + 2 * kv if arch.family.qkv_bias else 0) + q * h + mlp) // tp
    layer += 2 * h + (2 * arch.head_dim if arch.family.qk_norm else 0) + arch.num_experts * h
    n = layer * (arch.num_layers // pp)
    n += expert_parameter_count(arch, pp=pp, ep=ep, etp=tp if etp is None else etp)
    vocab = padded_vocab_size(arch.vocab_size, tp) // tp * h
    if stage == 0:
        n += vocab
    if stage == pp - 1:
        n += h
        if not arch.tie_word_embeddings or pp > 1:
            n += vocab
    return n


@dataclass
class MemoryRow:
    what: str
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    engine: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits + self.engine


def bytes_per_parameter(dtype_name: str) -> int:
    return params_dtype(dtype_name).itemsize


def optimizer_bytes_per_parameter(dtype_name: str) -> int:
    """Adam's two fp32 moments, plus the fp32 main copy of a bf16 parameter."""
    return 8 + (4 if bytes_per_parameter(dtype_name) < 4 else 0)


def estimate(cfg, student: ArchConfig, teacher: ArchConfig | None, *, world_size: int) -> list[MemoryRow]:
    """GiB per GPU for the busiest stage of the student and of the teacher."""
    bpe = bytes_per_parameter(cfg.student.dtype)
    s = cfg.student
    dp = world_size // (s.tp * s.pp)
    tokens = cfg.data.micro_batch_tokens
    worst = max(range(s.pp), key=lambda st: parameter_count(student, tp=s.tp, pp=s.pp, stage=st, ep=s.ep))
    p = parameter_count(student, tp=s.tp, pp=s.pp, stage=worst, ep=s.ep)
    per_param = optimizer_bytes_per_parameter(s.dtype)
    optimizer = p * per_param
    if cfg.optim.use_distributed_optimizer:  # dense state sharded over dp, experts' over expert dp
        experts = expert_parameter_count(student, pp=s.pp, ep=s.ep, etp=s.tp)
        edp = world_size // (s.pp * s.ep * s.tp)
        optimizer = (p - experts) * per_param / dp + experts * per_param / edp
    in_flight = s.pp  # 1F1B keeps up to pp micro-batches of activations on the first stage
    layers = student.num_layers // s.pp
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_turns * cfg.rollout.max_new_tokens
    lengths = worst_pack(tokens, longest)
    tokens = sum(lengths)  # a sequence longer than a micro-batch gets a pack of its own
    acts = layer_activation_bytes(student, tp=s.tp, bpe=bpe) * tokens * layers * in_flight
    if runs_math_attention(student, s.dtype, longest):
        kept = attention_score_bytes(student, tp=s.tp, lengths=lengths, per_element=MATH_ATTENTION_KEPT)
        running = attention_score_bytes(student, tp=s.tp, lengths=lengths[:1], per_element=MATH_ATTENTION_PEAK)
        acts += kept * layers * in_flight + running - running * MATH_ATTENTION_KEPT / MATH_ATTENTION_PEAK
    if student.is_moe:
        # Per layer, each rank handles about top-k routed copies of its tokens (the EP ranks
        # exchange equal shares on average): the dispatched and combined hidden states and the
        # experts' fc1 and activation outputs, split over TP (sequence parallel / expert TP).
        per_copy = (2 * student.hidden_size + 3 * student.moe_ffn_hidden_size) / s.tp * bpe
        acts += tokens * student.moe_top_k * per_copy * layers * in_flight
    v_local = padded_vocab_size(student.vocab_size, s.tp) // s.tp
    chunk = cfg.loss.chunk_size or max(1, (1 << 24) // v_local)
    if cfg.loss.fused_linear:  # logits exist one chunk at a time; the hidden-state gradient instead
        # fp32 chunk buffers (logits, their gradient, the loss's) and the fp32 weight gradient it
        # accumulates: 2.2 chunks and 1.6 weight shards, as measured by the dry run's rehearsal
        temporaries = 2.2 * min(chunk, tokens) * v_local * 4 + 1.6 * v_local * student.hidden_size * 4
        logits = tokens * student.hidden_size * 4 + temporaries
    else:  # the logits shard, its gradient, the loss's chunk temporaries
        logits = tokens * v_local * (bpe + 4) + 6 * min(chunk, tokens) * v_local * 4
    # the colocated engine holds 1/rollout.tp of the student per GPU
    engine = parameter_count(student, tp=cfg.rollout.tp, pp=1, stage=0) * bpe + cfg.rollout.kv_cache_gb * GiB
    rows = [MemoryRow("student (+ colocated rollout engine)", p * bpe / GiB, p * 4 / GiB,
                      optimizer / GiB, acts / GiB, logits / GiB, engine / GiB)]
    if teacher is not None and cfg.teacher.path:
        t = cfg.teacher
        bpe = bytes_per_parameter(t.dtype)
        tw = max(range(t.pp), key=lambda st: parameter_count(teacher, tp=t.tp, pp=t.pp, stage=st, ep=t.ep))
        tp_params = parameter_count(teacher, tp=t.tp, pp=t.pp, stage=tw, ep=t.ep)
        # forward only: one layer's live h-wide tensors, the norms' fp32 intermediates and the MLP's
        # f-wide shards (8.6 and 3.25 values per token: fitted to the rehearsal of Qwen2.5-7B at TP2
        # and Llama-3.1-70B at TP8)
        t_acts = bpe * tokens * (8.6 * teacher.hidden_size + 3.25 * teacher.ffn_hidden_size / t.tp)
        if runs_math_attention(teacher, t.dtype, longest):  # forward only: one sequence's scores at a time
            t_acts += attention_score_bytes(teacher, tp=t.tp, lengths=lengths[:1], per_element=MATH_ATTENTION_PEAK)
        t_logits = 0.0 if cfg.loss.fused_linear else tokens * (padded_vocab_size(teacher.vocab_size, t.tp) // t.tp) * bpe
        rows.append(MemoryRow("teacher (frozen, forward only)", tp_params * bpe / GiB, 0.0, 0.0,
                              t_acts / GiB, t_logits / GiB, 0.0))
    return rows


def format_table(rows: list[MemoryRow], *, gpu_memory_gb: float) -> str:
    cols = ("parameters", "gradients", "optimizer", "activations", "logits", "engine", "total")
    lines = [f"{'per GPU, GiB':38s} " + " ".join(f"{c:>11s}" for c in cols)]
    for r in rows:
        vals = [getattr(r, c) for c in cols]
        lines.append(f"{r.what:38s} " + " ".join(f"{v:11.2f}" for v in vals))
    ok = fits(rows, gpu_memory_gb=gpu_memory_gb)
    lines.append(f"colocated (student, engine and teacher share every GPU): {sum(r.total for r in rows):.2f} "
                 f"GiB per GPU, {'fits' if ok else 'DOES NOT FIT'} in {gpu_memory_gb:g} GiB (train.gpu_memory_gb)")
    if not ok:
        biggest = max(("activations", "logits", "engine", "optimizer"),
                      key=lambda c: sum(getattr(r, c) for r in rows))
        lines.append("  to fit: " + FIT_HINTS[biggest])
    return "\n".join(lines)


def fits(rows: list[MemoryRow], *, gpu_memory_gb: float) -> bool:
    return sum(r.total for r in rows) <= gpu_memory_gb


FIT_HINTS = {
    "activations": "fewer tokens per micro-batch (data.micro_batch_tokens) or more model parallelism "
                   "(student.tp, student.pp)",
    "logits": "loss.fused_linear=true, a smaller data.micro_batch_tokens, or a larger student.tp",
    "engine": "a larger rollout.tp (each GPU then holds 1/rollout.tp of the engine's weights) or a smaller "
              "rollout.kv_cache_gb",
    "optimizer": "optim.use_distributed_optimizer=true, or a larger student.tp / student.pp",
}


def step_tokens_per_replica(cfg, *, world_size: int) -> int:
    """Upper bound on the tokens one student replica trains on per step (every sequence at its
    longest: the prompt limit plus every turn's new tokens)."""
    s, r = cfg.student, cfg.rollout
    dp = world_size // (s.tp * s.pp)
    sequences = -(-cfg.train.prompts_per_step // dp) * r.n
    return sequences * (cfg.data.max_prompt_tokens + r.max_turns * r.max_new_tokens)


def teacher_signal_bytes_per_token(cfg, student: ArchConfig, teacher: ArchConfig | None) -> tuple[float, str]:
    """Host bytes per token a student last-stage rank keeps of the teacher between the phases."""
    bpe = bytes_per_parameter(cfg.teacher.dtype)
    need = cfg.loss.teacher_need
    if need == Need.TOKEN:
        return 4, "log-probs of the sampled tokens"
    if need == Need.TOPK:
        return cfg.loss.top_k * 12, f"top-{cfg.loss.top_k} ids and log-probs"
    width = (teacher or student)
    if need == Need.HIDDEN:
        return width.hidden_size * bpe, "final hidden states (loss.fused_linear)"
    return padded_vocab_size(width.vocab_size, cfg.teacher.tp) // cfg.teacher.tp * bpe, "logit shards"


def host_table(cfg, student: ArchConfig, teacher: ArchConfig | None, *, world_size: int,
               host_memory_gb: float, gpus_per_node: int = 8) -> tuple[str, bool]:
    """Micro-batches per step and the host memory the teacher's signals take; (text, fits)."""
    tokens = step_tokens_per_replica(cfg, world_size=world_size)
    per_token, what = teacher_signal_bytes_per_token(cfg, student, teacher)
    rank_gb = tokens * per_token / GiB
    node_gb = rank_gb * gpus_per_node
    fits = node_gb <= host_memory_gb
    lines = [f"per student replica and step, at most: {tokens} tokens in about "
             f"{-(-tokens // cfg.data.micro_batch_tokens)} micro-batches of data.micro_batch_tokens="
             f"{cfg.data.micro_batch_tokens}",
             f"teacher signals kept on the host between the phases ({what}): {rank_gb:.2f} GiB per rank, "
             f"{node_gb:.1f} GiB per {gpus_per_node}-GPU node, "
             + ("fits" if fits else "DOES NOT FIT") + f" in {host_memory_gb:g} GiB (train.host_memory_gb)"]
    if not fits:
        lines.append("  to fit: loss.fused_linear=true (hidden states instead of logit shards), "
                     "loss.support=teacher_topk_input, or fewer tokens per step (train.prompts_per_step, "
                     "rollout.n, rollout.max_new_tokens)")
    return "\n".join(lines), fits
