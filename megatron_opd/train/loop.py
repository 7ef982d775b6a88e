"""The OPD loop: every step is rollout -> teacher signals -> student update -> weight sync ->
metrics; around it evaluation, checkpoints that resume exactly, and logging."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.checkpoint.load import load_model, model_arch
from megatron_opd.config import Config, Phase
from megatron_opd.models.moe import ExpertLoad
from megatron_opd.models.packing import token_multiple
from megatron_opd.rollout.consistency import check_mismatch
from megatron_opd.rollout.engine import RolloutEngine
from megatron_opd.rollout.sync import SyncStats, WeightSync
from megatron_opd.teacher.signals import Need, Teacher, TeacherSignal
from megatron_opd.train.alignment import TokenizerPair
from megatron_opd.train.data import (Sequence, StepPrompts, check_tokenizers, eos_token_ids, load_prompts,
                                     load_tokenizer, pack_micro_batches)
from megatron_opd.train.environments import make_environment
from megatron_opd.train.evaluation import count_correct
from megatron_opd.train.experience import Rollouts
from megatron_opd.train.metrics import step_metrics
from megatron_opd.train.optim import NonFiniteGuard, forward_backward


class PhaseTimer:
    """Wall-clock seconds of a step's phases (``time/<phase>_s``) and of the whole step."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        begin = time.perf_counter()
        yield
        self.seconds[f"time/{phase}_s"] = time.perf_counter() - begin

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class StudentUpdate:
    outputs: list[dict]  # the objective's metrics of each micro-batch (last stage; [] elsewhere)
    lr: float
    grad_norm: float | None


class Trainer:
    """Builds everything from a :class:`Config` (collective: all ranks) and trains."""

    def __init__(self, cfg: Config, *, engine: RolloutEngine | None = None):
        """``engine`` reuses a running student engine (same architecture), e.g. across runs in
        one process; by default one is started."""
        self.cfg = cfg
        parallel.init_distributed()
        cfg.validate(world_size=dist.get_world_size())
        # Everything a user can get wrong, before any model is built or loaded.
        cfg.check_inputs()
        teacher_arch = model_arch(cfg.teacher.path) if cfg.teacher.path else None
        student_arch = model_arch(cfg.student.path)
        cfg.check_models(student_arch, teacher_arch)
        self.aligner = self._tokenizer_pair(student_arch, teacher_arch)
        self.run_dir = Path(cfg.train.run_dir)
        self.phases = cfg.phases()
        self.mp = parallel.initialize_global_model_parallel(cfg.student.layout, what="student")
        self.student = load_model(cfg.student.path, self.mp, seed=cfg.train.seed,
                                  params_dtype=cfg.student.params_dtype,
                                  moe_aux_loss_coeff=cfg.student.moe_aux_loss_coeff)
        self.expert_load = ExpertLoad(self.student) if self.student.arch.is_moe else None
        self.arch = self.student.arch
        self.trainable = cfg.optim.build(self.student, total_steps=cfg.train.steps,
                                         schedule=lambda step: self.phase_at(step).learning_rate(step))
        self.tokenizer = load_tokenizer(cfg.student.path)
        self.teacher = self._build_teacher()
        # A loss fused with the output layers needs the teacher's output-layer shard on the
        # student's last stage (once: the teacher is frozen).
        needs = [ph.config.loss.teacher_need for ph in self.phases]
        teacher_weight = self.teacher.output_weight(self.mp) if Need.HIDDEN in needs else None
        self.objectives = [ph.config.loss.build(self.student, teacher_output_weight=teacher_weight,
                                                teacher_temperature=cfg.teacher.temperature,
                                                rollout_temperature=ph.config.rollout.temperature,
                                                steps_per_generation=ph.config.rollout.steps_per_generation)
                           for ph in self.phases]
        self.buffer: dict[int, list[Sequence]] = {}  # step -> its sequences, from the last generation
        self.stop_ids = list(cfg.rollout.stop_token_ids) or eos_token_ids(self.arch.hf_config, self.tokenizer)
        self._start_rollouts(engine)
        self.checkpointer = cfg.checkpoint.build(self.run_dir, config_yaml=cfg.to_yaml(),
                                                 tokenizer_src=cfg.student.path)
        state = self.checkpointer.restore(self.trainable) or {}
        self.start_step = int(state.get("step", 0))
        self.guard = NonFiniteGuard(max_in_a_row=cfg.train.max_nonfinite_steps,
                                    skipped=int(state.get("skipped_steps", 0)))
        self.sync.sync(self.engine)
        self.logger = cfg.logging.build(self.run_dir, total_steps=cfg.train.steps, start_step=self.start_step,
                                        config=cfg.to_dict())
        if dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

    # --- set-up -------------------------------------------------------------------------------

    def phase_at(self, step: int) -> Phase:
        return next(ph for ph in self.phases if step < ph.end) if step < self.phases[-1].end else self.phases[-1]

    def _build_teacher(self) -> Teacher:
        """The teacher, built for the first phase that asks it for a signal (each phase sets the
        teacher's need when it starts; the top-k it sends does not change, Config.validate)."""
        cfg = self.cfg
        losses = [ph.config.loss for ph in self.phases]
        scoring = [loss for loss in losses if loss.teacher_need != Need.NONE] or [losses[0]]
        need = scoring[0].teacher_need if scoring[0].teacher_need != Need.NONE else Need.TOKEN
        top_k = next((loss.top_k for loss in scoring if loss.teacher_need == Need.TOPK), scoring[0].top_k)
        # A served teacher checks the ids it is sent against this vocabulary: its own, with its own tokenizer.
        vocab = self.arch.vocab_size if self.aligner is None else self.aligner.teacher.size
        teacher = cfg.teacher.build(need=need, top_k=top_k, vocab_size=vocab, seed=cfg.train.seed)
        if teacher.model is not None and cfg.loss.cross_tokenizer == "none":
            check_tokenizers(self.tokenizer, load_tokenizer(cfg.teacher.path), student_vocab=self.arch.vocab_size,
                             teacher_vocab=teacher.model.arch.vocab_size)
        return teacher

    def _tokenizer_pair(self, student_arch, teacher_arch) -> TokenizerPair | None:
        """A teacher with its own tokenizer: both tokenizers, to align every rollout to the teacher's
        (checked before any weight is loaded)."""
        cfg = self.cfg
        if cfg.loss.cross_tokenizer == "none":
            return None
        return cfg.loss.tokenizer_pair(load_tokenizer(cfg.student.path), load_tokenizer(cfg.teacher.path),
                                       student_path=cfg.student.path, teacher_path=cfg.teacher.path,
                                       student_vocab=student_arch.vocab_size, teacher_vocab=teacher_arch.vocab_size)

    def _start_rollouts(self, engine: RolloutEngine | None) -> None:
        """The prompts, the engines (after the trainer's groups exist, on every rank at the same
        point: vLLM joins the world group collectively) and the weight sync into them."""
        cfg, r = self.cfg, self.cfg.rollout
        records, self.eval_records = self._load_prompts()
        environment = make_environment(r.environment)  # the same in every phase (Config.validate)
        max_new_tokens = max(ph.config.rollout.max_new_tokens for ph in self.phases)
        max_total_tokens = min(self.arch.max_position_embeddings,
                               cfg.data.max_prompt_tokens + r.max_turns * max_new_tokens * 2)
        self.engine = engine or r.start_engine(self.arch, dtype=cfg.student.params_dtype,
                                               max_model_len=max_total_tokens, seed=cfg.train.seed)
        self._own_engine = engine is None
        if self.engine.tp != r.tp:
            raise ValueError(f"rollout.tp={r.tp}, but the engine passed in runs at tensor-parallel size {self.engine.tp}")
        self.sync = WeightSync(self.student, bucket_bytes=r.bucket_bytes, engine_tp=r.tp)
        self.teacher_engine = None
        if any(ph.config.rollout.uses_teacher_samples for ph in self.phases):  # in process (Config.validate)
            self.teacher_engine = r.start_engine(self.teacher.model.arch, dtype=cfg.teacher.params_dtype,
                                                 max_model_len=max_total_tokens, seed=cfg.train.seed + 1)
            WeightSync(self.teacher.model, bucket_bytes=r.bucket_bytes, engine_tp=r.tp).sync(self.teacher_engine)
        self.rollouts = []  # one per phase: its sampling, lmbda and off-policy source
        for ph in self.phases:
            pr = ph.config.rollout
            prompts = StepPrompts(records, per_step=cfg.train.prompts_per_step, seed=cfg.train.seed,
                                  shuffle=cfg.data.shuffle, lmbda=pr.lmbda)
            self.rollouts.append(Rollouts(pr, prompts, mp=self.mp, student_engine=self.engine,
                                          teacher_engine=self.teacher_engine, environment=environment,
                                          stop_token_ids=self.stop_ids, max_total_tokens=max_total_tokens,
                                          weight_field=ph.config.loss.weight_field, aligner=self.aligner,
                                          verifier=ph.config.loss.verifier_for(self.tokenizer,
                                                                               stop_token_ids=self.stop_ids)))

    def _load_prompts(self) -> tuple[list, list]:
        d = self.cfg.data

        def load(path):
            return load_prompts(path, self.tokenizer, vocab_size=self.arch.vocab_size,
                                max_prompt_tokens=d.max_prompt_tokens)

        records = load(d.train_path)
        eval_records = load(d.eval_path) if d.eval_path else []
        if self.cfg.eval.num_prompts:
            eval_records = eval_records[: self.cfg.eval.num_prompts]
        return records, eval_records

    # --- one step -------------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        """rollout (one generation every rollout.steps_per_generation steps) -> teacher signals ->
        student update -> weight sync (before the next generation or evaluation) -> metrics."""
        timer = PhaseTimer()
        phase = self.phase_at(step)
        # (a run resumed from a checkpoint inside a generation, which Config.validate rules out for
        # its own checkpoints, generates anew)
        generates = phase.generation_start(step) == step or step not in self.buffer
        if generates:
            with timer("rollout"):
                last = min(step + phase.config.rollout.steps_per_generation, phase.end)
                steps = list(range(step, last))
                self.buffer = dict(zip(steps, self.rollouts[phase.index].for_steps(steps)))
                self._engines("sleep")  # two-phase memory: the engines' GPU memory is the update's
        else:
            timer.seconds["time/rollout_s"] = 0.0
        seqs = self.buffer.pop(step)
        need = phase.config.loss.teacher_need
        with timer("teacher"):
            micro_batches = pack_micro_batches(seqs, budget=self.cfg.data.micro_batch_tokens,
                                               device=parallel.device(),
                                               multiple_of=token_multiple(self.student.config),
                                               lockstep=self.mp.layout.ep > 1)
            if need == Need.NONE:  # cross-entropy: the completion is the target
                signals = [TeacherSignal() for _ in micro_batches]
            else:
                self.teacher.need = need
                signals = self.teacher.signals(micro_batches, self.mp)
        with timer("student"):
            update = self.update_student(step, micro_batches, signals)
        synced = None
        if self._syncs_after(step):
            with timer("sync"):
                self._engines("wake_up")
                synced = self.sync.sync(self.engine)
        threshold = phase.config.rollout.mismatch_threshold_for(self.cfg.student.params_dtype) if generates else None
        metrics = self._metrics(seqs, update, synced, timer, mismatch_threshold=threshold)
        metrics["train/phase"] = float(phase.index)
        return metrics

    def _syncs_after(self, step: int) -> bool:
        """Whether the engine needs the weights after ``step``: the next step generates, evaluation
        is due, or the run ends."""
        done = step + 1
        if done >= self.cfg.train.steps or self.cfg.eval.due(done, self.cfg.train.steps):
            return True
        return self.phase_at(done).generation_start(done) == done

    def _engines(self, action: str) -> None:
        """``sleep`` or ``wake_up`` every rollout engine (vLLM's sleep mode on GPUs; no-op on CPU)."""
        for engine in (self.engine, self.teacher_engine):
            if engine is not None:
                getattr(engine, action)()

    def update_student(self, step: int, micro_batches: list[dict],
                       signals: list[TeacherSignal | None]) -> StudentUpdate:
        """Forward and backward through the pipeline schedule, then the optimizer step if the
        losses and gradients of every rank are finite."""
        lr = self.trainable.set_learning_rate(step)
        outputs = self._forward_backward(micro_batches, signals, self.objectives[self.phase_at(step).index])
        grad_norm = self.guard.step(self.trainable, outputs, step=step)
        return StudentUpdate(outputs, lr, grad_norm)

    def _forward_backward(self, micro_batches: list[dict], signals: list[TeacherSignal | None],
                          objective) -> list[dict]:
        def loss_fn(output, batch):
            return objective(output, batch, signals[batch["index"]])

        with objective.outputs():
            return forward_backward(self.trainable, micro_batches, loss_fn)

    def _metrics(self, seqs, update: StudentUpdate, synced: SyncStats | None, timer: PhaseTimer, *,
                 mismatch_threshold: float | None) -> dict:
        """The step's metrics; the trainer-vs-rollout mismatch must be within ``mismatch_threshold``
        on a step whose sequences were sampled with its weights (None: not checked; on later steps
        of a generation the mismatch measures how far the policy moved since)."""
        elapsed = timer.elapsed()
        metrics = step_metrics(update.outputs, seqs, self.mp)
        metrics.update(timer.seconds)
        if self.expert_load is not None:  # tokens per expert and router statistics of the update
            metrics.update(self.expert_load.collect())
        metrics.update({"lr": update.lr, "grad_norm": update.grad_norm, "skipped_steps": float(self.guard.skipped),
                        "tokens_per_s": metrics.pop("_tokens") / elapsed, "time/step_s": elapsed})
        if synced is not None:
            metrics["sync/bytes_per_s"] = synced.bytes_per_second
        if mismatch_threshold is not None:
            check_mismatch(metrics.get("rollout/logprob_abs_diff_max", 0.0), threshold=mismatch_threshold,
                           version=self.engine.version - 1)
        return metrics

    # --- evaluation, checkpoints, the run --------------------------------------------------------

    def evaluate(self) -> dict:
        """Greedy task accuracy on the held-out prompts, spread over the engine groups."""
        e = self.cfg.eval
        if not self.eval_records:
            return {}
        mine = self.eval_records[self.engine.group::self.engine.num_groups]
        correct = count_correct(self.engine, mine, self.tokenizer, metric=e.metric,
                                max_new_tokens=e.max_new_tokens, stop_token_ids=self.stop_ids)
        counted = self.engine.is_group_leader  # the ranks of an engine group share its answers
        counts = torch.tensor([float(correct * counted), float(len(mine) * counted)], dtype=torch.float64,
                              device=parallel.device())
        dist.all_reduce(counts)
        return {"eval/accuracy": counts[0].item() / max(counts[1].item(), 1.0)}

    def save(self, step: int) -> Path:
        return self.checkpointer.save(self.trainable, step, extra_state={"skipped_steps": self.guard.skipped})

    def train(self) -> dict:
        cfg = self.cfg
        last = {}
        if cfg.eval.every and self.start_step == 0 and self.eval_records:
            last = self.evaluate()
            self.logger.log(0, last)
        for step in range(self.start_step, cfg.train.steps):
            metrics = self.step(step)
            done = step + 1
            if cfg.eval.due(done, cfg.train.steps):
                metrics.update(self.evaluate())
            self.logger.log(done, metrics, console=done % cfg.logging.every == 0 or done == cfg.train.steps)
            self.logger.advance(1, loss=metrics["loss"])
            last = metrics
            if self.checkpointer.due(done, cfg.train.steps):
                self.save(done)
        if self.start_step < cfg.train.steps:
            self.save(cfg.train.steps)
        self.checkpointer.export(self.student)
        return last

    def close(self) -> None:
        self.logger.close()
        self.teacher.close()
        if self._own_engine:
            self.engine.close()
        if self.teacher_engine is not None:
            self.teacher_engine.close()
