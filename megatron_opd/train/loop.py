"""The OPD loop: rollouts -> teacher -> student update -> weight sync, with checkpoints that resume
exactly, metrics, evaluation."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd import parallel
from megatron_opd.config import Config
from megatron_opd.parallel import ParallelLayout
from megatron_opd.models.config import params_dtype
from megatron_opd.models.schedule import final_hidden_states, gather_sequence_parallel, output_weight
from megatron_opd.rollout.consistency import check_mismatch
from megatron_opd.rollout.engine import RolloutEngine
from megatron_opd.rollout.sync import WeightSync
from megatron_opd.train import checkpointing
from megatron_opd.train.data import (check_tokenizers, load_prompts, micro_batch, pack_sequences,
                                     step_prompt_indices)
from megatron_opd.train.environments import make_environment
from megatron_opd.train.evaluation import count_correct
from megatron_opd.train.experience import build_sequences
from megatron_opd.train.metrics import MetricsLogger
from megatron_opd.train.objective import OutputHeads, micro_batch_loss, teacher_need
from megatron_opd.train.optim import OptimConfig, Trainable, forward_backward, make_trainable, optimizer_step
from megatron_opd.utils import log0


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warmup to ``optim.lr``, then cosine / linear decay to ``optim.min_lr`` (or constant)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    span = max(1, cfg.train.steps - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)
    if o.decay == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - frac)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


def _tokenizer(path: str):
    """The HF tokenizer stored with a model (None if there is none: token-id data only)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(p))


class Trainer:
    """Builds everything from a validated :class:`Config` (collective: all ranks) and trains."""

    def __init__(self, cfg: Config, *, engine: RolloutEngine | None = None):
        """``engine`` reuses a running student engine (same architecture), e.g. across runs in
        one process; by default one is started."""
        from megatron_opd.checkpoint.load import load_model

        self.cfg = cfg
        parallel.init_distributed()
        world = dist.get_world_size()
        cfg.validate(world_size=world)
        self.run_dir = Path(cfg.train.run_dir)
        self.mp = parallel.initialize_global_model_parallel(ParallelLayout(cfg.student.tp, cfg.student.pp),
                                                            what="student")
        if cfg.train.prompts_per_step < self.mp.dp_size:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is smaller than the "
                             f"student's data-parallel size {self.mp.dp_size}")
        self.dtype = params_dtype(cfg.student.dtype, what="student.dtype")
        self.student = load_model(cfg.student.path, self.mp, seed=cfg.train.seed, params_dtype=self.dtype)
        self.arch = self.student.arch
        o = cfg.optim
        self.trainable: Trainable = make_trainable(self.student, OptimConfig(
            lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            use_distributed_optimizer=o.use_distributed_optimizer))
        self.tokenizer = _tokenizer(cfg.student.path)
        self.need = teacher_need(cfg.loss)
        self._build_teacher()
        # A loss fused with the output layers needs the teacher's output-layer shard on the
        # student's last stage (once: the teacher is frozen).
        self.teacher_lm_head = self.teacher.lm_head_for(self.mp) if self.need == "hidden" else None
        self.stop_ids = list(cfg.rollout.stop_token_ids) or self._eos_ids()
        self.records = load_prompts(cfg.data.train_path, self.tokenizer, vocab_size=self.arch.vocab_size,
                                    max_prompt_tokens=cfg.data.max_prompt_tokens)
        self.eval_records = (load_prompts(cfg.data.eval_path, self.tokenizer, vocab_size=self.arch.vocab_size,
                                          max_prompt_tokens=cfg.data.max_prompt_tokens)
                             if cfg.data.eval_path else [])
        if cfg.eval.num_prompts:
            self.eval_records = self.eval_records[: cfg.eval.num_prompts]
        self.environment = make_environment(cfg.rollout.environment)
        r = cfg.rollout
        self.max_total_tokens = min(self.arch.max_position_embeddings,
                                    cfg.data.max_prompt_tokens + r.max_turns * r.max_new_tokens * 2)
        # Engines after the trainer's groups exist, on every rank at the same point (vLLM joins
        # the world group collectively).
        self.engine = engine or RolloutEngine(self.arch, dtype=self.dtype, kv_cache_bytes=int(r.kv_cache_gb * (1 << 30)),
                                              max_model_len=self.max_total_tokens, seed=cfg.train.seed)
        self._own_engine = engine is None
        self.sync = WeightSync(self.student, bucket_bytes=int(r.bucket_mb * (1 << 20)))
        self.teacher_engine = None
        if r.lmbda < 1.0 and r.offpolicy_source == "teacher":
            if self.teacher is None:
                raise ValueError("rollout.offpolicy_source=teacher needs an in-process teacher (teacher.path)")
            self.teacher_engine = RolloutEngine(self.teacher.arch, dtype=self.teacher.model.config.params_dtype,
                                                kv_cache_bytes=int(r.kv_cache_gb * (1 << 30)),
                                                max_model_len=self.max_total_tokens, seed=cfg.train.seed + 1)
            WeightSync(self.teacher.model, bucket_bytes=int(r.bucket_mb * (1 << 20))).sync(self.teacher_engine)
        self.start_step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._resume()
        self.sync.sync(self.engine)
        self.logger = MetricsLogger(self.run_dir, total_steps=cfg.train.steps, start_step=self.start_step,
                                    tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project,
                                    progress_bar=cfg.logging.progress_bar, config=cfg.to_dict())
        if dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

    # --- set-up -------------------------------------------------------------------------------

    def _build_teacher(self) -> None:
        cfg = self.cfg
        self.teacher = None
        self.served = None
        if cfg.teacher.served_url:
            from megatron_opd.teacher.served import ServedTeacher
            from megatron_opd.teacher.megatron import ServedTeacherSource

            # vocab_size: an out-of-vocabulary id would take the server's engine down
            client = ServedTeacher(cfg.teacher.served_url, model=cfg.teacher.served_model or None,
                                   top_k=cfg.loss.top_k, timeout=cfg.teacher.served_timeout_s,
                                   max_concurrency=cfg.teacher.served_concurrency,
                                   vocab_size=self.arch.vocab_size)
            self.served = ServedTeacherSource(client, need=self.need, top_k=cfg.loss.top_k)
            return
        from megatron_opd.teacher.megatron import MegatronTeacher

        self.teacher = MegatronTeacher(cfg.teacher.path, ParallelLayout(cfg.teacher.tp, cfg.teacher.pp),
                                       need=self.need, top_k=cfg.loss.top_k,
                                       temperature=cfg.teacher.temperature, seed=cfg.train.seed,
                                       params_dtype=params_dtype(cfg.teacher.dtype, what="teacher.dtype"))
        check_tokenizers(self.tokenizer, _tokenizer(cfg.teacher.path), student_vocab=self.arch.vocab_size,
                         teacher_vocab=self.teacher.arch.vocab_size)

    def _eos_ids(self) -> list[int]:
        eos = self.arch.hf_config.get("eos_token_id")
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]

    def _resume(self) -> None:
        c = self.cfg.checkpoint
        path = None
        if c.resume == "auto":
            path = checkpointing.latest_checkpoint(self.run_dir)
        elif c.resume != "none":
            path = Path(c.resume)
        if path is None:
            return
        state = checkpointing.load_checkpoint(self.trainable, path, verify=c.verify)
        self.start_step = int(state["step"])
        self.nonfinite_total = int(state.get("skipped_steps", 0))
        log0(f"resumed from {path} at step {self.start_step}")

    # --- one step -------------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        cfg, mp = self.cfg, self.mp
        times = {}
        t0 = time.perf_counter()
        indices = step_prompt_indices(len(self.records), step=step, prompts_per_step=cfg.train.prompts_per_step,
                                      seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        flags = (torch.rand(len(indices), generator=g) < cfg.rollout.lmbda).tolist()
        mine = list(range(mp.dp_rank, len(indices), mp.dp_size))
        records = [self.records[indices[i]] for i in mine]
        seqs = build_sequences(records, [flags[i] for i in mine], cfg=cfg.rollout, step=step, seed=cfg.train.seed,
                               stop_token_ids=self.stop_ids, student_engine=self.engine,
                               teacher_engine=self.teacher_engine, mp=mp, environment=self.environment,
                               max_total_tokens=self.max_total_tokens, weight_field=cfg.loss.weight_field)
        times["time/rollout_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        device = parallel.device()
        packs = pack_sequences(seqs, budget=cfg.data.micro_batch_tokens)
        mbs = []
        for m, idx in enumerate(packs):
            mb = micro_batch(seqs, idx, device=device, sliding_window=self.arch.sliding_window)
            mb["index"] = m
            mbs.append(mb)
        if self.served is not None:
            signals = self.served.signals(mbs, mp, [[seqs[i].tokens for i in idx] for idx in packs])
        else:
            signals = self.teacher.signals(mbs, mp)
        times["time/teacher_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        vocab = self.arch.vocab_size
        fused = cfg.loss.fused_linear
        heads = None
        if fused and mp.is_last_stage:
            heads = OutputHeads(output_weight(self.student), self.teacher_lm_head,
                                reduce_hidden_grad=not self.student.config.sequence_parallel)

        def output_fn(output, batch):
            if fused:  # the final hidden states [1, L, h] instead of logits
                output = gather_sequence_parallel(output, self.student)
            loss_sum, n, metrics = micro_batch_loss(
                output, batch, signals[batch["index"]], loss=cfg.loss, vocab_size=vocab,
                tp_group=mp.tp_group, rollout_temperature=cfg.rollout.temperature,
                teacher_temperature=cfg.teacher.temperature, heads=heads)
            metrics["loss_sum"] = loss_sum.detach().clone()
            return loss_sum, n, metrics

        lr = learning_rate(cfg, step)
        for group in self.trainable.optimizer.param_groups:
            group["lr"] = lr
        with final_hidden_states(self.student) if fused else contextlib.nullcontext():
            outputs = forward_backward(self.trainable, mbs, output_fn)
        self._fault_drill(step, "raise")
        if self._fault_drill(step, "nan"):
            next(iter(self.student.module.parameters())).main_grad.fill_(float("nan"))
        finite = self._grads_finite(outputs)
        grad_norm = float("nan")
        if finite:
            applied, grad_norm = optimizer_step(self.trainable)
            finite = applied and grad_norm is not None and math.isfinite(grad_norm)
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.trainable.ddp.zero_grad_buffer()
            self.trainable.optimizer.zero_grad()
            log0(f"step {step}: non-finite loss or gradient; update skipped "
                 f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteError(f"{self.nonfinite_in_a_row} consecutive steps with a non-finite loss "
                                     f"or gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})")
        times["time/student_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        sync_stats = self.sync.sync(self.engine)
        times["time/sync_s"] = time.perf_counter() - t3
        elapsed = time.perf_counter() - t0
        metrics = self._reduce_metrics(outputs, seqs)
        metrics.update(times)
        metrics.update({"lr": lr, "grad_norm": grad_norm, "skipped_steps": float(self.nonfinite_total),
                        "sync/bytes_per_s": sync_stats.bytes_per_second,
                        "tokens_per_s": metrics.pop("_tokens") / elapsed, "time/step_s": elapsed})
        check_mismatch(metrics.get("rollout/logprob_abs_diff_max", 0.0),
                       threshold=cfg.rollout.mismatch_threshold, version=self.engine.version - 1)
        return metrics

    def _fault_drill(self, step: int, kind: str) -> bool:
        """True (or raise, for "raise") when the configured fault drill fires here. It fires in a
        job's first attempt only, so that a torchrun restart (--max-restarts) shows the recovery."""
        t = self.cfg.train
        if t.inject_fault != kind or t.inject_fault_step != step or dist.get_rank() != t.inject_fault_rank:
            return False
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            return False
        if kind == "raise":
            raise RuntimeError(f"injected fault (train.inject_fault=raise) at step {step} on rank {dist.get_rank()}")
        return True

    def _grads_finite(self, outputs) -> bool:
        """All ranks agree whether every gradient (and the loss) is finite. The checks stay on the
        compute device; one flag comes back to the host."""
        flags = [torch.isfinite(o["loss_sum"]).all() for o in outputs]
        flags += [torch.isfinite(p.main_grad).all() for p in self.student.module.parameters()
                  if getattr(p, "main_grad", None) is not None]
        ok = torch.ones(1, device=parallel.device())
        if flags:
            ok.mul_(torch.stack(flags).all())
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _reduce_metrics(self, outputs: list[dict], seqs) -> dict:
        """The step's metrics summed (maxed) over the ranks that hold them: the micro-batches'
        sums stay on the compute device, and the reduced values come to the host in one copy."""
        mp = self.mp
        device = parallel.device()
        contributes = mp.is_last_stage and mp.tp_rank == 0
        keys = ["loss_sum", "divergence_sum", "loss_tokens", "mismatch_sum", "mismatch_tokens", "topk_overlap_sum",
                "topk_mass_overlap_sum"]
        counts = [0.0] * 4
        if mp.tp_rank == 0 and mp.pp_rank == 0:  # one rank per replica counts the sequences
            counts = [sum(s.completion_len for s in seqs),
                      sum(s.completion_len - sum(s.completion_mask) for s in seqs),
                      len(seqs), sum(len(s.tokens) for s in seqs)]
        sums = torch.tensor([0.0] * len(keys) + counts, dtype=torch.float64, device=device)
        mx = torch.zeros(1, dtype=torch.float64, device=device)
        if contributes:
            for o in outputs:
                for j, k in enumerate(keys):
                    if k in o:
                        sums[j] += torch.as_tensor(o[k], device=device).to(torch.float64)
                if "mismatch_max" in o:
                    torch.maximum(mx, torch.as_tensor(o["mismatch_max"], device=device).to(torch.float64), out=mx)
        dist.all_reduce(sums)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        host = torch.cat([sums, mx]).tolist()
        s = dict(zip(keys, host))
        completion, tool, nseq, total_tokens = host[len(keys):len(keys) + 4]
        max_mismatch = host[-1]
        tokens = max(s["loss_tokens"], 1.0)
        out = {"loss": s["loss_sum"] / tokens, "divergence": s["divergence_sum"] / tokens,
               "response_length": completion / max(nseq, 1), "masked_tool_fraction": tool / max(completion, 1),
               "loss_tokens": s["loss_tokens"], "_tokens": total_tokens}
        if s["topk_overlap_sum"]:
            out["topk_overlap"] = s["topk_overlap_sum"] / tokens
            out["topk_mass_overlap"] = s["topk_mass_overlap_sum"] / tokens
        if s["mismatch_tokens"]:
            out["rollout/logprob_abs_diff_max"] = max_mismatch
            out["rollout/logprob_abs_diff_mean"] = s["mismatch_sum"] / s["mismatch_tokens"]
        return out

    # --- evaluation, checkpoints, the run --------------------------------------------------------

    def evaluate(self) -> dict:
        """Greedy task accuracy on the held-out prompts, spread over every rank's engine."""
        e = self.cfg.eval
        if not self.eval_records:
            return {}
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = self.eval_records[rank::world]
        correct = count_correct(self.engine, mine, self.tokenizer, metric=e.metric,
                                max_new_tokens=e.max_new_tokens, stop_token_ids=self.stop_ids)
        counts = torch.tensor([float(correct), float(len(mine))], dtype=torch.float64, device=parallel.device())
        dist.all_reduce(counts)
        correct, total = counts.tolist()
        return {"eval/accuracy": correct / max(total, 1.0)}

    def save(self, step: int) -> Path:
        c = self.cfg.checkpoint

        def drill():
            if self._fault_drill(step, "kill_in_checkpoint"):
                os.kill(os.getpid(), signal.SIGKILL)

        path = checkpointing.save_checkpoint(self.trainable, run_dir=self.run_dir, step=step,
                                             config_yaml=self.cfg.to_yaml(),
                                             extra_state={"skipped_steps": self.nonfinite_total},
                                             keep_last=c.keep_last, tokenizer_src=self.cfg.student.path,
                                             mid_write=drill)
        log0(f"saved {path}")
        return path

    def train(self) -> dict:
        cfg = self.cfg
        last = {}
        if cfg.eval.every and self.start_step == 0 and self.eval_records:
            ev = self.evaluate()
            self.logger.log(0, ev)
            last.update(ev)
        step = self.start_step
        for step in range(self.start_step, cfg.train.steps):
            metrics = self.step(step)
            done = step + 1
            if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.train.steps):
                metrics.update(self.evaluate())
            self.logger.log(done, metrics, console=done % cfg.logging.every == 0 or done == cfg.train.steps)
            self.logger.advance(1, loss=metrics["loss"])
            last = metrics
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.train.steps:
                self.save(done)
        if self.start_step < cfg.train.steps:
            self.save(cfg.train.steps)
        if cfg.checkpoint.export_hf:
            self.export_hf(self.run_dir / "hf")
        return last

    def export_hf(self, out_dir: Path) -> None:
        from megatron_opd.checkpoint.convert import write_hf_model

        write_hf_model(self.student, out_dir, dtype=torch.float32, max_shard_bytes=5 * 10**9, force=True,
                       tokenizer_src=self.cfg.student.path)

    def close(self) -> None:
        self.logger.close()
        if self._own_engine:
            self.engine.close()
        if self.teacher_engine is not None:
            self.teacher_engine.close()
