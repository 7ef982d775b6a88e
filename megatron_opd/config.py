"""Typed run configuration: YAML recipes (which may derive from a base recipe), dotted command-line
overrides, validation that names the offending field, and printing of the resolved config."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "sampled_reverse_kl")
SUPPORTS = ("full", "teacher_topk", "student_topk", "teacher_topk_input")


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


@dataclass
class TeacherConfig(ModelConfig):
    # Served teacher: a stock `vllm serve` endpoint instead of an in-process megatron teacher.
    served_url: str = ""
    served_model: str = ""
    served_timeout_s: float = 120.0
    served_concurrency: int = 4
    # Temperature applied to the teacher's logits (the student's is loss.temperature).
    temperature: float = 1.0


@dataclass
class DataConfig:
    train_path: str = ""
    eval_path: str = ""
    max_prompt_tokens: int = 512
    # Tokens per packed micro-batch (sequences are packed, never padded).
    micro_batch_tokens: int = 4096
    shuffle: bool = True


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
    kv_cache_gb: float = 1.0
    bucket_mb: float = 256.0
    # Fail the run when trainer-vs-rollout log-prob mismatch exceeds this (null: never).
    mismatch_threshold: float | None = 1e-3
    max_turns: int = 1
    environment: str = ""  # a multi-turn environment (see train/environments.py), "" = single turn


@dataclass
class LossConfig:
    kind: str = "reverse_kl"
    beta: float = 0.5
    support: str = "full"
    top_k: int = 0
    temperature: float = 1.0
    chunk_size: int = 0  # 0: automatic
    fused_linear: bool = False
    # Weight each sample's tokens by its metadata field (e.g. a reward); "" = uniform.
    weight_field: str = ""


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


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 disables
    metric: str = "exact_match"  # "exact_match" | "boxed_math"
    max_new_tokens: int = 64
    num_prompts: int = 0  # 0: all


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | a checkpoint directory
    export_hf: bool = False  # also export the final student as an HF model
    verify: str = "hash"  # on load, check the manifest: "hash" (sizes and sha256), "size", "none"


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_opd"
    progress_bar: bool = True


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 64
    seed: int = 1234
    run_dir: str = "runs/opd"
    max_nonfinite_steps: int = 3  # consecutive non-finite steps before the run stops
    gpu_memory_gb: float = 80.0  # for the dry-run's memory check
    host_memory_gb: float = 512.0  # CPU RAM per node, for the dry-run's memory check
    # Fault drill, to check that a cluster set-up fails fast and resumes: at step
    # `inject_fault_step` on global rank `inject_fault_rank`, "raise" an exception, make the
    # gradients "nan", or "kill_in_checkpoint" (SIGKILL mid-way through writing the checkpoint of
    # step `inject_fault_step`). Drills fire in a job's first attempt only (not after a torchrun
    # restart), so that the restart shows the recovery.
    inject_fault: str = ""
    inject_fault_step: int = -1
    inject_fault_rank: int = 0


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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self, *, world_size: int | None = None) -> None:
        """Raise ValueError naming the field for anything inconsistent."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.student.path, "student.path is required")
        need(self.teacher.path or self.teacher.served_url,
             "teacher.path or teacher.served_url is required")
        need(self.data.train_path, "data.train_path is required")
        for name, m in (("student", self.student), ("teacher", self.teacher)):
            need(m.tp >= 1 and m.pp >= 1, f"{name}.tp and {name}.pp must be >= 1")
            need(m.ep >= 1, f"{name}.ep must be >= 1, got {m.ep}")
            need(m.moe_aux_loss_coeff >= 0, f"{name}.moe_aux_loss_coeff must be >= 0, got {m.moe_aux_loss_coeff}")
            if world_size is not None and (m.path or name == "student"):
                if world_size % (m.tp * m.pp):
                    raise ValueError(f"{name}: tp * pp = {m.tp} * {m.pp} = {m.tp * m.pp} does not "
                                     f"divide the world size {world_size}")
                if (world_size // m.pp) % (m.ep * m.tp):
                    raise ValueError(f"{name}: ep * tp = {m.ep} * {m.tp} = {m.ep * m.tp} does not divide "
                                     f"the {world_size // m.pp} ranks of a pipeline stage (world size "
                                     f"{world_size} / pp {m.pp})")
        need(self.loss.kind in LOSS_KINDS, f"loss.kind must be one of {LOSS_KINDS}, got {self.loss.kind!r}")
        need(self.loss.support in SUPPORTS, f"loss.support must be one of {SUPPORTS}, got {self.loss.support!r}")
        need(0.0 <= self.loss.beta <= 1.0, f"loss.beta must be in [0, 1], got {self.loss.beta}")
        need(self.loss.temperature > 0, f"loss.temperature must be > 0, got {self.loss.temperature}")
        need(self.teacher.temperature > 0, f"teacher.temperature must be > 0, got {self.teacher.temperature}")
        if self.loss.support != "full" or self.teacher.served_url:
            need(self.loss.top_k >= 1, f"loss.top_k must be >= 1 with loss.support={self.loss.support!r}"
                 + (" and a served teacher" if self.teacher.served_url else ""))
        if self.teacher.served_url:
            need(self.teacher.temperature == 1.0,
                 "teacher.temperature must be 1.0 with a served teacher (vLLM's prompt log-probs are "
                 "always at temperature 1)")
            need(self.loss.support == "teacher_topk_input" or self.loss.kind == "sampled_reverse_kl",
                 "a served teacher (teacher.served_url) gives top-k log-probs only: set "
                 "loss.support=teacher_topk_input or loss.kind=sampled_reverse_kl")
        if self.loss.support in ("full", "teacher_topk", "student_topk") and self.loss.kind != "sampled_reverse_kl":
            need(self.teacher.tp == self.student.tp,
                 f"loss.support={self.loss.support!r} needs the teacher's logits in the student's vocab "
                 f"sharding: teacher.tp ({self.teacher.tp}) must equal student.tp ({self.student.tp}); "
                 "use loss.support=teacher_topk_input for a differently split teacher")
        need(0.0 <= self.rollout.lmbda <= 1.0, f"rollout.lmbda must be in [0, 1], got {self.rollout.lmbda}")
        need(self.rollout.offpolicy_source in ("dataset", "teacher"),
             f"rollout.offpolicy_source must be 'dataset' or 'teacher', got {self.rollout.offpolicy_source!r}")
        need(self.rollout.n >= 1, f"rollout.n must be >= 1, got {self.rollout.n}")
        need(self.rollout.temperature > 0, f"rollout.temperature must be > 0, got {self.rollout.temperature}")
        need(0 < self.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.rollout.top_p}")
        need(self.rollout.top_p == 1 or self.rollout.mismatch_threshold is None,
             f"rollout.top_p={self.rollout.top_p} with rollout.mismatch_threshold set: vLLM's log-probs "
             "are of the top-p truncated distribution, the trainer's of the full one, so they differ by "
             "design; set rollout.mismatch_threshold=null to sample with top-p")
        need(self.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
        need(self.rollout.max_turns >= 1, "rollout.max_turns must be >= 1")
        need(self.data.micro_batch_tokens >= 8, "data.micro_batch_tokens must be >= 8")
        need(self.train.steps >= 1, f"train.steps must be >= 1, got {self.train.steps}")
        need(self.train.prompts_per_step >= 1, "train.prompts_per_step must be >= 1")
        need(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        need(self.optim.decay in ("cosine", "constant", "linear"),
             f"optim.decay must be cosine, constant or linear, got {self.optim.decay!r}")
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        need(self.eval.metric in ("exact_match", "boxed_math"),
             f"eval.metric must be exact_match or boxed_math, got {self.eval.metric!r}")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        need(self.train.inject_fault in ("", "raise", "nan", "kill_in_checkpoint"),
             f"train.inject_fault must be raise, nan or kill_in_checkpoint, got {self.train.inject_fault!r}")
        need(self.checkpoint.verify in ("hash", "size", "none"),
             f"checkpoint.verify must be hash, size or none, got {self.checkpoint.verify!r}")
        need(self.checkpoint.resume in ("auto", "none") or Path(self.checkpoint.resume).is_dir(),
             f"checkpoint.resume must be auto, none or an existing directory, got {self.checkpoint.resume!r}")


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
        return _coerce(value, inner[0], where)
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
