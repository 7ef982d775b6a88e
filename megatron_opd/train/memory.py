"""Per-GPU memory estimate of a run's layout, for `megatron-opd train --dry-run --world-size N`.

A planning estimate, not a measurement: parameter and optimizer bytes are exact for the layout and
the models' dtypes (``student.dtype``, ``teacher.dtype``: fp32, or bf16 with fp32 main parameters
in the optimizer; gradients are reduced in fp32 either way);
activations follow Korthikanti et al. (2022) for a transformer layer with flash attention and
sequence parallelism (about 34 bytes x tokens x hidden / TP per layer, for the micro-batches a
1F1B pipeline keeps in flight): linear in the tokens of a packed micro-batch, which is a THD pack
with no [L, L] mask or score matrix (TE's attention, or ours per sequence); logits count the student's shard, its gradient and the chunked
loss's temporaries (the teacher's shard waits on the CPU between phases).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opd.models.config import ArchConfig, padded_vocab_size, params_dtype
from megatron_opd.teacher.signals import Need

GiB = 1 << 30


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
    # 34 bytes per token and hidden unit is Korthikanti's count for 2-byte activations.
    acts = 34 * bpe / 2 * tokens * student.hidden_size / s.tp * (student.num_layers // s.pp) * in_flight
    if student.is_moe:
        # Per layer, each rank handles about top-k routed copies of its tokens (the EP ranks
        # exchange equal shares on average): the dispatched and combined hidden states and the
        # experts' fc1 and activation outputs, split over TP (sequence parallel / expert TP).
        per_copy = (2 * student.hidden_size + 3 * student.moe_ffn_hidden_size) / s.tp * bpe
        acts += tokens * student.moe_top_k * per_copy * (student.num_layers // s.pp) * in_flight
    v_local = padded_vocab_size(student.vocab_size, s.tp) // s.tp
    chunk = cfg.loss.chunk_size or max(1, (1 << 24) // v_local)
    temporaries = 6 * min(chunk, tokens) * v_local * 4
    if cfg.loss.fused_linear:  # logits exist one chunk at a time; the hidden-state gradient instead
        logits = tokens * student.hidden_size * 4 + temporaries
    else:  # the logits shard, its gradient, the loss's chunk temporaries
        logits = tokens * v_local * (bpe + 4) + temporaries
    # the colocated engine (TP 1 per rank) holds the whole student
    engine = parameter_count(student, tp=1, pp=1, stage=0) * bpe + cfg.rollout.kv_cache_gb * GiB
    rows = [MemoryRow("student (+ colocated rollout engine)", p * bpe / GiB, p * 4 / GiB,
                      optimizer / GiB, acts / GiB, logits / GiB, engine / GiB)]
    if teacher is not None and cfg.teacher.path:
        t = cfg.teacher
        bpe = bytes_per_parameter(t.dtype)
        tw = max(range(t.pp), key=lambda st: parameter_count(teacher, tp=t.tp, pp=t.pp, stage=st, ep=t.ep))
        tp_params = parameter_count(teacher, tp=t.tp, pp=t.pp, stage=tw, ep=t.ep)
        t_acts = 2 * tokens * teacher.hidden_size * bpe / t.tp * 4  # forward only: a few live layers
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
    "engine": "a smaller rollout.kv_cache_gb",
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
