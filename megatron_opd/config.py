"""Typed run configuration: one dataclass per section, each validating itself (errors name
``section.field``) and building what it configures; the checks that span sections, once each, in
:meth:`Config.validate`; YAML recipes (which may derive from a base recipe) and dotted overrides."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from megatron_opd.models.builder import ShardedModel
from megatron_opd.models.config import ArchConfig, params_dtype
from megatron_opd.parallel import ParallelLayout, cuda_available
from megatron_opd.rollout.engine import RolloutEngine, SamplingConfig
from megatron_opd.rollout.plan import check_engine_tp
from megatron_opd.teacher.megatron import MegatronTeacher
from megatron_opd.teacher.served import ServedTeacher, TeacherClient
from megatron_opd.teacher.signals import Need, Teacher
from megatron_opd.train.checkpointing import VERIFY_MODES, Checkpointer
from megatron_opd.train.environments import ENVIRONMENTS
from megatron_opd.train.evaluation import METRICS, Verifier
from megatron_opd.train.memory import parameter_count
from megatron_opd.train.metrics import MetricsLogger
from megatron_opd.train.alignment import AlignmentError, TokenizerPair
from megatron_opd.train.objective import (CROSS_ENTROPY, CROSS_TOKENIZER, KINDS, POLICY_GRADIENT_KINDS,
                                          SAMPLED_REVERSE_KL, SUPPORTS, TEACHER_TOPK_INPUT, Objective, make_objective,
                                          teacher_need)
from megatron_opd.train.optim import Trainable, make_trainable
from megatron_opd.utils import check_writable

DECAYS = ("cosine", "constant", "linear")
TRUNCATED_IMPORTANCE = ("auto", "on", "off")
# rollout.mismatch_threshold=auto: the largest trainer-vs-rollout log-prob difference of a sampled
# token that a healthy sync shows, with room, per student dtype (docs/gpu.md has the measurements:
# fp32 engines agree to ~1e-4, a stale or garbled sync shows differences of 0.1-10).
MISMATCH_THRESHOLDS = {torch.float32: 1e-3, torch.bfloat16: 0.05}
OFFPOLICY_SOURCES = ("dataset", "teacher")


def _require(condition, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """A model: an HF directory or a megatron_opd checkpoint, and how it is split."""

    path: str = ""
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel (mixture-of-experts models); experts split tp ways within
    # Mixture-of-experts load-balancing loss (megatron's Switch aux loss) while training this
    # model; off by default: a distilled student follows its teacher's routing.
    moe_aux_loss_coeff: float = 0.0
    # Parameter dtype: "fp32" or "bf16" (megatron's mixed precision: bf16 parameters and
    # activations, fp32 main parameters and gradient reduction; the divergence math stays fp32).
    dtype: str = "fp32"

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.tp, self.pp, self.ep)

    @property
    def params_dtype(self) -> torch.dtype:
        return params_dtype(self.dtype)

    def validate(self, name: str) -> None:
        _require(self.path, f"{name}.path is required")
        self._validate_split(name)

    def _validate_split(self, name: str) -> None:
        _require(self.tp >= 1 and self.pp >= 1, f"{name}.tp and {name}.pp must be >= 1")
        _require(self.ep >= 1, f"{name}.ep must be >= 1, got {self.ep}")
        _require(self.moe_aux_loss_coeff >= 0,
                 f"{name}.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        params_dtype(self.dtype, what=f"{name}.dtype")


@dataclass
class TeacherConfig(ModelConfig):
    # Served teacher: a stock `vllm serve` endpoint instead of an in-process megatron teacher.
    served_url: str = ""
    served_model: str = ""
    served_timeout_s: float = 120.0
    served_concurrency: int = 4
    # Temperature applied to the teacher's logits (the student's is loss.temperature).
    temperature: float = 1.0

    def validate(self, name: str = "teacher") -> None:
        _require(self.path or self.served_url, f"{name}.path or {name}.served_url is required")
        self._validate_split(name)
        _require(self.temperature > 0, f"{name}.temperature must be > 0, got {self.temperature}")
        if self.served_url:
            _require(self.temperature == 1.0,
                     f"{name}.temperature must be 1.0 with a served teacher (vLLM's prompt log-probs are "
                     "always at temperature 1)")

    def build(self, *, need: Need, top_k: int, vocab_size: int, seed: int) -> Teacher:
        """The teacher: served at ``served_url``, else a megatron model on process groups of its
        own (collective: every rank builds it)."""
        if self.served_url:
            # vocab_size: an out-of-vocabulary id would take the server's engine down
            client = TeacherClient(self.served_url, model=self.served_model or None, top_k=top_k,
                                   timeout=self.served_timeout_s, max_concurrency=self.served_concurrency,
                                   vocab_size=vocab_size)
            return ServedTeacher(client, need=need)
        return MegatronTeacher.load(self.path, self.layout, need=need, top_k=top_k, temperature=self.temperature,
                               seed=seed, params_dtype=self.params_dtype)


@dataclass
class DataConfig:
    train_path: str = ""
    eval_path: str = ""
    max_prompt_tokens: int = 512
    # Tokens per packed micro-batch (sequences are packed, never padded).
    micro_batch_tokens: int = 4096
    shuffle: bool = True

    def validate(self, name: str = "data") -> None:
        _require(self.train_path, f"{name}.train_path is required")
        _require(self.micro_batch_tokens >= 8, f"{name}.micro_batch_tokens must be >= 8")


@dataclass
class RolloutConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: list = field(default_factory=list)  # empty: the tokenizer's eos
    # Fraction of prompts trained on-policy (student samples); the rest use `offpolicy_source`.
    lmbda: float = 1.0
    offpolicy_source: str = "dataset"  # "dataset" completions or "teacher" samples
    kv_cache_gb: float = 1.0  # per GPU (per engine rank)
    bucket_mb: float = 256.0
    # The engines' tensor-parallel size, independent of the student's TP/PP: the world is tiled
    # into engine groups of `tp` consecutive ranks, each one vLLM engine with one shard per rank.
    tp: int = 1
    # Fail the run when trainer-vs-rollout log-prob mismatch exceeds this (null: never; "auto": the
    # threshold for the student's dtype, MISMATCH_THRESHOLDS).
    mismatch_threshold: float | str | None = "auto"
    max_turns: int = 1
    environment: str = ""  # a multi-turn environment (see train/environments.py), "" = single turn
    # Buffered generation: one generation of k x the step's prompts feeds k optimizer steps (the
    # policy-gradient kinds then weight by the truncated importance ratio current / sampling policy).
    steps_per_generation: int = 1

    def validate(self, name: str = "rollout") -> None:
        _require(0.0 <= self.lmbda <= 1.0, f"{name}.lmbda must be in [0, 1], got {self.lmbda}")
        _require(self.offpolicy_source in OFFPOLICY_SOURCES,
                 f"{name}.offpolicy_source must be 'dataset' or 'teacher', got {self.offpolicy_source!r}")
        _require(self.n >= 1, f"{name}.n must be >= 1, got {self.n}")
        _require(isinstance(self.tp, int) and self.tp >= 1, f"{name}.tp must be an integer >= 1, got {self.tp!r}")
        _require(self.temperature > 0, f"{name}.temperature must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"{name}.top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_p == 1 or self.mismatch_threshold is None,
                 f"{name}.top_p={self.top_p} with {name}.mismatch_threshold set: vLLM's log-probs are of the "
                 "top-p truncated distribution, the trainer's of the full one, so they differ by design; "
                 f"set {name}.mismatch_threshold=null to sample with top-p")
        _require(not isinstance(self.mismatch_threshold, str) or self.mismatch_threshold == "auto",
                 f"{name}.mismatch_threshold must be a number, auto or null, got {self.mismatch_threshold!r}")
        _require(self.max_new_tokens >= 1, f"{name}.max_new_tokens must be >= 1")
        _require(self.max_turns >= 1, f"{name}.max_turns must be >= 1")
        _require(isinstance(self.steps_per_generation, int) and self.steps_per_generation >= 1,
                 f"{name}.steps_per_generation must be an integer >= 1, got {self.steps_per_generation!r}")
        _require(not self.environment or self.environment in ENVIRONMENTS,
                 f"{name}.environment={self.environment!r} is unknown (known: {', '.join(ENVIRONMENTS)})")

    def mismatch_threshold_for(self, student_dtype: torch.dtype) -> float | None:
        """The trainer-vs-rollout log-prob gap that stops the run, for a student in ``student_dtype``."""
        if self.mismatch_threshold == "auto":
            return MISMATCH_THRESHOLDS[student_dtype]
        return self.mismatch_threshold

    @property
    def uses_teacher_samples(self) -> bool:
        return self.lmbda < 1.0 and self.offpolicy_source == "teacher"

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))

    def sampling(self, *, seed: int, step: int, stop_token_ids: list[int]) -> SamplingConfig:
        """How ``step``'s completions are sampled (each request's seed derives from this one)."""
        return SamplingConfig(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                              seed=seed * 1_000_033 + step)

    def start_engine(self, arch: ArchConfig, *, dtype: torch.dtype, max_model_len: int, seed: int) -> RolloutEngine:
        """A rollout engine for ``arch`` in ``dtype`` (its model's) with this section's KV cache
        (collective: every rank starts one at the same point)."""
        weights = self.engine_weight_bytes(arch, dtype=dtype)
        return RolloutEngine(arch, dtype=dtype, kv_cache_bytes=int(self.kv_cache_gb * (1 << 30)),
                             max_model_len=max_model_len, seed=seed, weights_bytes=weights, tp=self.tp)

    def engine_weight_bytes(self, arch: ArchConfig, *, dtype: torch.dtype) -> int:
        """One engine rank's share of the weights (its 1/tp of every split tensor)."""
        return parameter_count(arch, tp=self.tp, pp=1, stage=0) * dtype.itemsize


@dataclass
class LossConfig:
    kind: str = "reverse_kl"
    beta: float = 0.5
    support: str = "full"
    top_k: int = 0
    # Top-k supports: keep the bucket of each side's remaining mass (false: renormalize over the k
    # tokens; for reverse_kl_advantage, only the k tokens carry an advantage).
    topk_tail: bool = True
    temperature: float = 1.0
    chunk_size: int = 0  # 0: automatic
    fused_linear: bool = False
    # Weight each sample's tokens by its metadata field (e.g. a reward); "" = uniform.
    weight_field: str = ""
    # Verifier-weighted distillation: score each sample against its row's "answer" with an eval
    # metric (exact_match | boxed_math; "" = off), reward r in {0, 1}, logged as rollout/reward_mean;
    # the sample's weight is multiplied by 1 - r + r * correct_weight (0: skip solved samples).
    verifier: str = ""
    correct_weight: float = 1.0
    # Policy-gradient kinds (sampled_reverse_kl, reverse_kl_advantage): truncated importance weight
    # min(pi_trainer / pi_rollout, cap) on the engine's samples. "auto": on when the student is bf16
    # (trainer and engine round differently) or rollout.steps_per_generation > 1, else off.
    truncated_importance: str = "auto"  # "auto" | "on" | "off"
    importance_cap: float = 2.0
    # A teacher with its own tokenizer (docs/cross_tokenizer.md): "none" (the teacher uses the student's
    # token ids, checked at start) or "span" (every rollout aligned to the teacher's tokenization; the
    # span-level sampled reverse KL over the text both tokenizations cover; needs kind=sampled_reverse_kl).
    cross_tokenizer: str = "none"
    # cross_tokenizer: a completion whose aligned spans cover less than this fraction of its text stops
    # the run with an error naming it (special tokens without a teacher counterpart, broken UTF-8...).
    min_aligned_fraction: float = 0.5
    # cross_tokenizer: student special-token strings -> the teacher's ({"<|im_end|>": "<end_of_turn>"});
    # the others map to the teacher's token of the same content, then of the same role (BOS, EOS).
    special_tokens: dict = field(default_factory=dict)

    def validate(self, name: str = "loss") -> None:
        _require(self.kind in KINDS, f"{name}.kind must be one of {KINDS}, got {self.kind!r}")
        self._validate_cross_tokenizer(name)
        _require(self.truncated_importance in TRUNCATED_IMPORTANCE,
                 f"{name}.truncated_importance must be auto, on or off, got {self.truncated_importance!r}")
        _require(self.importance_cap >= 1.0, f"{name}.importance_cap must be >= 1, got {self.importance_cap}")
        _require(self.support in SUPPORTS, f"{name}.support must be one of {SUPPORTS}, got {self.support!r}")
        _require(0.0 <= self.beta <= 1.0, f"{name}.beta must be in [0, 1], got {self.beta}")
        _require(not self.verifier or self.verifier in METRICS,
                 f"{name}.verifier must be empty or one of {tuple(METRICS)}, got {self.verifier!r}")
        _require(self.correct_weight >= 0, f"{name}.correct_weight must be >= 0, got {self.correct_weight}")
        _require(self.temperature > 0, f"{name}.temperature must be > 0, got {self.temperature}")
        if self.support != "full":
            _require(self.top_k >= 1, f"{name}.top_k must be >= 1 with {name}.support={self.support!r}")
        _require(self.topk_tail or self.support != "full" or self.kind in (SAMPLED_REVERSE_KL, CROSS_ENTROPY),
                 f"{name}.topk_tail=false needs a top-k support (loss.support=student_topk, teacher_topk or "
                 f"{TEACHER_TOPK_INPUT}), got support={self.support!r}")

    def _validate_cross_tokenizer(self, name: str) -> None:
        _require(self.cross_tokenizer in CROSS_TOKENIZER,
                 f"{name}.cross_tokenizer must be one of {CROSS_TOKENIZER}, got {self.cross_tokenizer!r}")
        _require(not isinstance(self.min_aligned_fraction, bool) and 0.0 <= self.min_aligned_fraction <= 1.0,
                 f"{name}.min_aligned_fraction must be in [0, 1], got {self.min_aligned_fraction!r}")
        _require(isinstance(self.special_tokens, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.special_tokens.items()),
            f"{name}.special_tokens must map student special-token strings to teacher ones, got "
            f"{self.special_tokens!r}")
        if self.cross_tokenizer == "none":
            return
        _require(self.kind == SAMPLED_REVERSE_KL,
                 f"{name}.cross_tokenizer={self.cross_tokenizer} is the span-level sampled reverse KL: set "
                 f"{name}.kind={SAMPLED_REVERSE_KL} (got {self.kind!r})")
        _require(not self.fused_linear, f"{name}.cross_tokenizer={self.cross_tokenizer} takes the student's "
                 f"logits: set {name}.fused_linear=false")

    def tokenizer_pair(self, student_tokenizer, teacher_tokenizer, *, student_path: str, teacher_path: str,
                       student_vocab: int, teacher_vocab: int) -> TokenizerPair | None:
        """The two tokenizers for aligning rollouts to the teacher's tokenization (None without
        ``cross_tokenizer``); AlignmentError naming the side and its path for a missing tokenizer
        or one with ids the model has no row for."""
        if self.cross_tokenizer == "none":
            return None
        for side, tok, path in (("student", student_tokenizer, student_path), ("teacher", teacher_tokenizer,
                                                                               teacher_path)):
            if tok is None:
                raise AlignmentError(f"loss.cross_tokenizer={self.cross_tokenizer} needs the {side}'s tokenizer: "
                                     f"none next to {side}.path={path} (tokenizer.json, tokenizer.model or "
                                     "tokenizer_config.json)")
        pair = TokenizerPair(student_tokenizer, teacher_tokenizer, special_tokens=self.special_tokens or None,
                             min_coverage=self.min_aligned_fraction, min_coverage_name="loss.min_aligned_fraction")
        for side, vocab, path in ((pair.student, student_vocab, student_path), (pair.teacher, teacher_vocab,
                                                                                teacher_path)):
            if side.size > vocab:
                raise AlignmentError(f"{side.name}.path={path}: its tokenizer has {side.size} token ids, its model "
                                     f"{vocab} rows: the tokenizer is not the model's")
        return pair

    @property
    def teacher_need(self) -> Need:
        return teacher_need(kind=self.kind, support=self.support, fused_linear=self.fused_linear)

    def build(self, student: ShardedModel, *, teacher_output_weight: torch.Tensor | None,
              teacher_temperature: float, rollout_temperature: float, steps_per_generation: int = 1) -> Objective:
        """The student's objective on its last stage (``teacher_output_weight``: the teacher's
        output-layer shard for a loss fused with the output layers)."""
        cap = self.importance_cap_for(student.config.params_dtype, steps_per_generation=steps_per_generation)
        return make_objective(student, kind=self.kind, beta=self.beta, support=self.support, top_k=self.top_k,
                              temperature=self.temperature, chunk_size=self.chunk_size or None,
                              fused_linear=self.fused_linear, teacher_output_weight=teacher_output_weight,
                              teacher_temperature=teacher_temperature, rollout_temperature=rollout_temperature,
                              importance_cap=cap, topk_tail=self.topk_tail, cross_tokenizer=self.cross_tokenizer)

    def verifier_for(self, tokenizer, *, stop_token_ids: list[int]) -> Verifier | None:
        """The verifier that scores and reweights each sample (None without ``verifier``)."""
        if not self.verifier:
            return None
        return Verifier(self.verifier, tokenizer, stop_token_ids=stop_token_ids, correct_weight=self.correct_weight)

    def importance_cap_for(self, student_dtype: torch.dtype, *, steps_per_generation: int = 1) -> float | None:
        """The truncated importance weight's cap for a student in ``student_dtype`` whose samples
        feed ``steps_per_generation`` optimizer steps; None: off."""
        on = self.truncated_importance == "on" or (
            self.truncated_importance == "auto" and (student_dtype == torch.bfloat16 or steps_per_generation > 1))
        return self.importance_cap if on and self.kind in POLICY_GRADIENT_KINDS else None


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine" | "constant" | "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False

    def validate(self, name: str = "optim") -> None:
        _require(self.lr > 0, f"{name}.lr must be > 0, got {self.lr}")
        _require(self.decay in DECAYS, f"{name}.decay must be cosine, constant or linear, got {self.decay!r}")
        _require(self.warmup_steps >= 0, f"{name}.warmup_steps must be >= 0")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                 f"{name}.adam_beta1/adam_beta2 must be in [0, 1)")
        _require(self.clip_grad >= 0, f"{name}.clip_grad must be >= 0 (0 disables clipping)")

    def check_device(self, name: str = "optim") -> None:
        """What this machine cannot run (checked when building, not in a dry run for another)."""
        _require(not self.use_distributed_optimizer or cuda_available(),
                 f"{name}.use_distributed_optimizer=true needs CUDA (megatron's distributed optimizer "
                 "asserts CUDA tensors); set it to false on CPU")

    def learning_rate(self, step: int, *, total_steps: int) -> float:
        """Linear warmup to ``lr``, then cosine / linear decay to ``min_lr`` (or constant)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = max(1, total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1 - frac)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * frac))

    def build(self, model: ShardedModel, *, total_steps: int, schedule=None) -> Trainable:
        """megatron's DDP and Adam over ``model`` with these settings, and this LR schedule (or
        ``schedule``, step -> learning rate: a run's phases each have their own)."""
        self.validate()
        self.check_device()
        if schedule is None:
            def schedule(step):
                return self.learning_rate(step, total_steps=total_steps)
        return make_trainable(model, self, schedule=schedule)


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 disables
    metric: str = "exact_match"  # "exact_match" | "boxed_math"
    max_new_tokens: int = 64
    num_prompts: int = 0  # 0: all

    def validate(self, name: str = "eval") -> None:
        _require(self.metric in METRICS, f"{name}.metric must be exact_match or boxed_math, got {self.metric!r}")

    def due(self, done: int, total_steps: int) -> bool:
        return bool(self.every) and (done % self.every == 0 or done == total_steps)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | a checkpoint directory
    export_hf: bool = False  # also export the final student as an HF model
    verify: str = "hash"  # on load, check the manifest: "hash" (sizes and sha256), "size", "none"

    def validate(self, name: str = "checkpoint") -> None:
        _require(self.keep_last >= 1, f"{name}.keep_last must be >= 1")
        _require(self.verify in VERIFY_MODES, f"{name}.verify must be hash, size or none, got {self.verify!r}")
        _require(self.resume in ("auto", "none") or Path(self.resume).is_dir(),
                 f"{name}.resume must be auto, none or an existing directory, got {self.resume!r}")

    def build(self, run_dir: str | Path, *, config_yaml: str, tokenizer_src: str) -> Checkpointer:
        return Checkpointer(run_dir, every=self.every, keep_last=self.keep_last, resume=self.resume,
                            verify=self.verify, export_hf=self.export_hf, config_yaml=config_yaml,
                            tokenizer_src=tokenizer_src)


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_opd"
    progress_bar: bool = True

    def validate(self, name: str = "logging") -> None:
        _require(self.every >= 1, f"{name}.every must be >= 1")

    def build(self, run_dir: str | Path, *, total_steps: int, start_step: int, config: dict) -> MetricsLogger:
        return MetricsLogger(run_dir, total_steps=total_steps, start_step=start_step, tensorboard=self.tensorboard,
                             wandb=self.wandb, wandb_project=self.wandb_project, progress_bar=self.progress_bar,
                             config=config)


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 64
    seed: int = 1234
    run_dir: str = "runs/opd"
    max_nonfinite_steps: int = 3  # consecutive non-finite steps before the run stops
    gpu_memory_gb: float = 80.0  # for the dry-run's memory check
    host_memory_gb: float = 512.0  # CPU RAM per node, for the dry-run's memory check
    # Phases of one run, in order: each {steps: N, rollout: {...}, loss: {...}, optim: {...}} runs
    # N steps with those fields overriding the recipe's (their steps add up to train.steps; the last
    # phase's steps default to the rest); e.g. a cross-entropy cold start on teacher samples, then
    # OPD. [] = one phase of train.steps.
    phases: list = field(default_factory=list)

    def validate(self, name: str = "train") -> None:
        _require(self.steps >= 1, f"{name}.steps must be >= 1, got {self.steps}")
        _require(self.prompts_per_step >= 1, f"{name}.prompts_per_step must be >= 1")


PHASE_SECTIONS = ("rollout", "loss", "optim")
# What a phase may not change: the engines, the teacher's transfer and the optimizer are built once.
PHASE_FIXED = {"rollout": ("kv_cache_gb", "max_turns", "environment", "bucket_mb", "tp"),
               "loss": ("fused_linear", "cross_tokenizer", "min_aligned_fraction", "special_tokens"),
               "optim": ("weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
                         "use_distributed_optimizer")}


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` of the run, trained with ``config`` (the recipe with the phase's overrides)."""

    index: int
    start: int
    end: int
    config: "Config"

    @property
    def steps(self) -> int:
        return self.end - self.start

    def generation_start(self, step: int) -> int:
        """The step whose generation feeds ``step`` (``rollout.steps_per_generation`` steps each,
        counted from the phase's start)."""
        return step - (step - self.start) % self.config.rollout.steps_per_generation

    def learning_rate(self, step: int) -> float:
        """The phase's optim schedule, restarted at its first step."""
        return self.config.optim.learning_rate(step - self.start, total_steps=self.steps)


@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def phases(self) -> list[Phase]:
        """The run's phases (one of train.steps without ``train.phases``); ValueError naming
        ``train.phases[i]...`` for a malformed phase."""
        if not self.train.phases:
            return [Phase(0, 0, self.train.steps, self)]
        _require(isinstance(self.train.phases, list), f"train.phases must be a list, got {self.train.phases!r}")
        base = self.to_dict()
        base["train"]["phases"] = []
        out, start = [], 0
        for i, entry in enumerate(self.train.phases):
            where = f"train.phases[{i}]"
            _require(isinstance(entry, dict), f"{where} must be a mapping with steps and overrides, got {entry!r}")
            unknown = sorted(set(entry) - {"steps", *PHASE_SECTIONS})
            _require(not unknown, f"{where}: unknown key(s) {unknown}; a phase has steps and overrides of "
                                  f"{', '.join(PHASE_SECTIONS)}")
            last = i == len(self.train.phases) - 1
            steps = entry.get("steps", self.train.steps - start if last else None)
            _require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
                     f"{where}.steps must be an integer >= 1 (the last phase's defaults to the rest of train.steps, "
                     f"{self.train.steps - start}), got {steps!r}")
            data = copy.deepcopy(base)
            for section in PHASE_SECTIONS:
                override = entry.get(section) or {}
                _require(isinstance(override, dict), f"{where}.{section} must be a mapping, got {override!r}")
                _deep_update(data[section], override)
            try:
                config = _build(Config, data, "")
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            out.append(Phase(i, start, start + steps, config))
            start += steps
        _require(start == self.train.steps,
                 f"train.phases: the phases' steps add up to {start}, but train.steps is {self.train.steps}")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, *, world_size: int | None = None) -> None:
        """Raise ValueError naming the field for anything inconsistent: every section by itself,
        then what spans sections (and, given ``world_size``, the layouts)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if world_size is not None:
            self._check_layouts(world_size)
        self._check_teacher_serves_the_loss()
        self._check_generations()
        if self.train.phases:
            self._check_phases(world_size)

    def _check_generations(self) -> None:
        """A checkpoint falls where a generation starts, so that resuming regenerates nothing that
        a step of the interrupted run had already trained on."""
        k, every = self.rollout.steps_per_generation, self.checkpoint.every
        _require(k == 1 or every % k == 0,
                 f"checkpoint.every={every} must be a multiple of rollout.steps_per_generation={k} (a resumed "
                 "run starts with a generation)")

    def _check_phases(self, world_size: int | None) -> None:
        """Every phase validated as a run of its own, then what may not change between phases."""
        phases = self.phases()
        for ph in phases:
            try:
                ph.config.validate(world_size=world_size)
            except ValueError as e:
                raise ValueError(f"train.phases[{ph.index}]: {e}") from None
            k = ph.config.rollout.steps_per_generation
            _require(ph.start % k == 0,
                     f"train.phases[{ph.index}] starts at step {ph.start}, not a multiple of its "
                     f"rollout.steps_per_generation={k} (a checkpoint there would fall inside a generation)")
        for section, names in PHASE_FIXED.items():
            for name in names:
                values = {ph.index: getattr(getattr(ph.config, section), name) for ph in phases}
                _require(len(set(map(repr, values.values()))) == 1,
                         f"train.phases: {section}.{name} may not change between phases (it is built once), "
                         f"got {values}")
        topk = {ph.config.loss.top_k for ph in phases if ph.config.loss.teacher_need == Need.TOPK}
        _require(len(topk) <= 1, f"train.phases: loss.top_k may not change between phases where the teacher "
                                 f"sends its top-k, got {sorted(topk)}")

    def _check_teacher_serves_the_loss(self) -> None:
        loss, teacher = self.loss, self.teacher
        if teacher.served_url:
            _require(loss.top_k >= 1, "loss.top_k must be >= 1 with a served teacher (teacher.served_url)")
            _require(loss.support == TEACHER_TOPK_INPUT or loss.kind in (SAMPLED_REVERSE_KL, CROSS_ENTROPY),
                     "a served teacher (teacher.served_url) gives top-k log-probs only: set "
                     f"loss.support={TEACHER_TOPK_INPUT} or loss.kind={SAMPLED_REVERSE_KL}")
            _require(not self.rollout.uses_teacher_samples,
                     "rollout.offpolicy_source=teacher needs an in-process teacher (teacher.path)")
            _require(loss.cross_tokenizer == "none" or teacher.path,
                     f"loss.cross_tokenizer={loss.cross_tokenizer} with a served teacher needs teacher.path: the "
                     "served model's directory (its tokenizer and config.json)")
        elif loss.teacher_need in (Need.LOGITS, Need.HIDDEN):
            _require(teacher.tp == self.student.tp,
                     f"loss.support={loss.support!r} needs the teacher's logits in the student's vocab sharding: "
                     f"teacher.tp ({teacher.tp}) must equal student.tp ({self.student.tp}); "
                     f"use loss.support={TEACHER_TOPK_INPUT} for a differently split teacher")

        if loss.cross_tokenizer != "none":
            _require(not self.rollout.uses_teacher_samples,
                     f"loss.cross_tokenizer={loss.cross_tokenizer} with rollout.offpolicy_source=teacher: the "
                     "teacher's samples are in its own token ids, which the student cannot train on")

    def _check_layouts(self, world_size: int) -> None:
        """Each model's tp * pp divides the world; every student replica gets a prompt."""
        dp = self.student.layout.data_parallel_size(world_size, what="student")
        if not self.teacher.served_url:
            self.teacher.layout.data_parallel_size(world_size, what="teacher")
        _require(world_size % self.rollout.tp == 0,
                 f"rollout.tp={self.rollout.tp} does not divide the world size {world_size}: the world is "
                 "tiled into engine groups of rollout.tp consecutive ranks")
        _require(self.train.prompts_per_step >= dp,
                 f"train.prompts_per_step={self.train.prompts_per_step} is smaller than the student's "
                 f"data-parallel size {dp}")

    def check_models(self, student: ArchConfig, teacher: ArchConfig | None = None) -> None:
        """Check every field that depends on the models against their configs (read from
        config.json, before any weight is loaded); ValueError naming the field."""
        student.check_parallel(tp=self.student.tp, pp=self.student.pp, ep=self.student.ep, what="student")
        _require(not student.is_moe or self.student.tp == 1,
                 f"student.tp={self.student.tp}: a mixture-of-experts student trains at TP > 1 only with "
                 "sequence parallelism (megatron's MoE layer), which the trainer does not turn on; use "
                 "student.tp=1 and split the experts with student.ep")
        _require(self.student.ep == 1 or self.loss.cross_tokenizer == "none",
                 f"loss.cross_tokenizer={self.loss.cross_tokenizer!r} with student.ep={self.student.ep}: the "
                 "filler micro-batches of expert-parallel lockstep carry no teacher tokenization; use "
                 "student.ep=1 or a teacher with the student's tokenizer")
        if teacher is not None:
            teacher.check_parallel(tp=self.teacher.tp, pp=self.teacher.pp, ep=self.teacher.ep, what="teacher")
        check_engine_tp(student, self.rollout.tp)
        if teacher is not None and self.rollout.uses_teacher_samples:
            check_engine_tp(teacher, self.rollout.tp, what="rollout.tp (the teacher's engine)")
        vocab = student.vocab_size
        for ph in self.phases():
            where = f"train.phases[{ph.index}]: " if self.train.phases else ""
            top_k = ph.config.loss.top_k
            _require(top_k <= vocab, f"{where}loss.top_k={top_k} is larger than the student's vocabulary ({vocab})")
        for i in self.rollout.stop_token_ids:
            _require(isinstance(i, int) and 0 <= i < vocab,
                     f"rollout.stop_token_ids: {i!r} is not a token id of the student's vocabulary [0, {vocab})")

    def check_inputs(self) -> None:
        """The data files exist and hold a row; the run directory can be written (before any work)."""
        for name in ("train_path", "eval_path"):
            path = getattr(self.data, name)
            if not path:
                continue
            _require(Path(path).is_file(), f"data.{name}: {path} does not exist")
            with open(path) as f:
                _require(any(line.strip() for line in f), f"data.{name}: {path} is empty (no rows)")
        check_writable(self.train.run_dir, directory=True, what="train.run_dir")


# --- YAML and overrides -------------------------------------------------------------------------

BASE_KEY = "base"  # a recipe may name a base recipe (path relative to itself) it derives from


def _load_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: recipe file does not exist")
    if path.resolve() in seen:
        raise ValueError(f"{path}: recipe inherits from itself ({' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of sections")
    base = data.pop(BASE_KEY, None)
    if base:
        merged = _load_yaml((path.parent / base), seen + (path.resolve(),))
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _coerce(value, annotation, where: str):
    """Convert ``value`` (from YAML or a command-line string) to the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for kind in inner[:-1]:  # the first member type the value converts to
            try:
                return _coerce(value, kind, where)
            except ValueError:
                pass
        return _coerce(value, inner[-1], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        return "" if value is None else str(value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
            if not isinstance(value, list):
                value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"unknown config field {where!r} (known in {prefix.rstrip('.') or 'config'}: "
                             f"{', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, where + ".")
        else:
            kwargs[key] = _coerce(value, hint, where)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["trainer.lr=1e-6", "student.tp=2"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A Config from a YAML recipe (optional) plus dotted overrides; not yet validated."""
    data = _load_yaml(Path(path)) if path else {}
    _deep_update(data, parse_overrides(overrides or []))
    return _build(Config, data, "")


def config_from_dict(data: dict) -> Config:
    return _build(Config, json.loads(json.dumps(data)), "")
