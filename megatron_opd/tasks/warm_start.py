"""The demo's warm starts: how the shipped teacher and student in ``tasks/warm_starts/`` were made.

Plain-PyTorch supervised training on the arithmetic task. The runs must escape a loss plateau
near 1.38, and whether and when they do depends on floating-point reduction order (thread count,
CPU, BLAS kernels), so they are not reproducible across machines: that is why the demo ships
their result instead of training them. Re-create them with::

    python -m megatron_opd.tasks.demo --retrain-warm-starts DIR

which writes ``DIR/teacher``, ``DIR/student`` and ``DIR/warm_starts.json`` (the accuracies, steps,
seeds, thread count and library versions of the run); ``--warm-starts DIR`` then runs the demo
from them.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch

from megatron_opd.tasks import arithmetic as task

TEACHER = dict(hidden=128, heads=4, layers=2)
STUDENT = dict(hidden=64, heads=2, layers=2)
TEACHER_TARGET = 0.98
STUDENT_TARGET = (0.12, 0.45)  # warm-start accuracy window: mid-jump
# Tried in this order (seeds 5 and 6 jumped early in a measurement here; the stall rule moves on).
STUDENT_SEEDS = (5, 6, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12)
EVAL_PROMPTS = 1000
INFO_FILE = "warm_starts.json"
# The cross-tokenizer demo's teacher: the teacher's shape, trained on the task written in digit pairs
# (tasks/arithmetic.py: make_pair_tokenizer), so its vocabulary and ids are not the student's.
PAIR_TEACHER = "teacher_pairs"


def eval_set(num: int = EVAL_PROMPTS, encoding: str = "chars") -> torch.Tensor:
    """Token ids (prompt and answer, in ``encoding``) of the first ``num`` held-out pairs: the
    prompts of eval.jsonl, on which the trainer's runs are scored too."""
    rows = torch.tensor(task.shuffled_pairs("eval")[:num])
    return task.ENCODINGS[encoding].encode(rows[:, 0], rows[:, 1])


@torch.no_grad()
def accuracy(model, rows: torch.Tensor, prompt_len: int) -> float:
    """Greedy exact match of the answer tokens (+ eos) after the first ``prompt_len`` of ``rows``."""
    was_training = model.training
    model.eval()
    ids = rows[:, :prompt_len]
    for _ in range(rows.shape[1] - prompt_len):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return (ids[:, prompt_len:] == rows[:, prompt_len:]).all(dim=1).float().mean().item()


def model_accuracy(model_dir: str | Path, num: int = EVAL_PROMPTS, encoding: str = "chars") -> float:
    """Held-out accuracy of a saved HF model (the demo checks its warm starts with it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return accuracy(model, eval_set(num, encoding), task.ENCODINGS[encoding].prompt_len)


def train(out_dir: Path, shape: dict, *, seed: int, stop, give_up=None, max_steps: int = 2000,
          eval_every: int = 50, eval_from: int = 0, encoding: str = "chars") -> tuple[float, int] | None:
    """Supervised training on the task until ``stop(accuracy)``; saves the most accurate weights
    seen (loss spikes happen at this learning rate) as an HF model + tokenizer and returns
    (their accuracy, their step). ``give_up(step, smoothed_loss, accuracy)`` abandons a run that
    will not get there (returns None, saves nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    enc = task.ENCODINGS[encoding]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**task.llama_config(**shape, vocab_size=enc.vocab_size, eos_id=enc.eos_id))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pairs = torch.tensor(task.shuffled_pairs("train"))
    train_ids = enc.encode(pairs[:, 0], pairs[:, 1])
    ev, p_len = eval_set(encoding=encoding), enc.prompt_len
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, 2000) / 2000)))
    g = torch.Generator().manual_seed(seed)
    acc, best, smooth = 0.0, (-1.0, 0, None), None
    start = time.time()
    for step in range(1, max_steps + 1):
        batch = train_ids[torch.randint(0, len(train_ids), (256,), generator=g)]
        logits = model(batch[:, :-1]).logits[:, p_len - 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch[:, p_len:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if step >= eval_from and step % eval_every == 0:
            acc = accuracy(model, ev, p_len)
            print(f"  [{out_dir.name} seed {seed}] step {step} loss {smooth:.3f} held-out accuracy {acc:.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if acc > best[0]:
                best = (acc, step, {k: v.clone() for k, v in model.state_dict().items()})
            if stop(acc):
                best = (acc, step, None)
                break
            if give_up is not None and give_up(step, smooth, acc):
                return None
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.save_pretrained(out_dir)
    enc.make_tokenizer(out_dir)
    return best[0], best[1]


class StudentStall:
    """When to abandon a student seed (as measured on this task): some seeds
    sit on the loss plateau near 1.38 for well over 1000 steps; others leave it and then stall
    near 0.1 accuracy, and such students do not respond to distillation. Seeds that jump reach
    the window within ~100 steps of leaving the plateau."""

    def __init__(self, lo: float):
        self.lo = lo
        self.left_plateau = None

    def __call__(self, step: int, loss: float, acc: float) -> bool:
        if self.left_plateau is None and loss < 0.8:
            self.left_plateau = step
        if self.left_plateau is None:
            return step >= 1200
        return step - self.left_plateau > 200 and acc < self.lo


def train_pair_teacher(out: Path) -> dict:
    """Train the cross-tokenizer demo's teacher into ``out/teacher_pairs`` and record it in
    ``out/warm_starts.json`` (kept: the other warm starts' record)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print("training the digit-pair teacher (plain PyTorch, 3-6 min)...", flush=True)
    result = train(out / PAIR_TEACHER, TEACHER, seed=0, stop=lambda a: a >= TEACHER_TARGET, eval_every=100,
                   eval_from=300, encoding="pairs")
    if result[0] < TEACHER_TARGET:
        raise RuntimeError(f"the digit-pair teacher reached only {result[0]:.3f} held-out accuracy in 2000 steps "
                           f"(target {TEACHER_TARGET}); try another OMP_NUM_THREADS")
    info_file = out / INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info.update({"teacher_pairs_accuracy": result[0], "teacher_pairs_step": result[1], "teacher_pairs_seed": 0,
                 "teacher_pairs_threads": torch.get_num_threads(),
                 "teacher_pairs_seconds": round(time.time() - start),
                 "teacher_pairs_command": "python -m megatron_opd.tasks.demo --retrain-pair-teacher DIR"})
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def retrain(out: Path) -> dict:
    """Train the teacher, then student seeds until one stops inside the accuracy window; write
    both (plus ``warm_starts.json``) into ``out``. Raises when no seed gets there."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print("training the teacher (plain PyTorch, 3-6 min)...", flush=True)
    teacher = train(out / "teacher", TEACHER, seed=0, stop=lambda a: a >= TEACHER_TARGET,
                    eval_every=100, eval_from=500)
    if teacher[0] < TEACHER_TARGET:
        raise RuntimeError(f"the teacher reached only {teacher[0]:.3f} held-out accuracy in 2000 steps "
                           f"(target {TEACHER_TARGET}); its plateau escape depends on the machine: "
                           "try another OMP_NUM_THREADS")
    lo, hi = STUDENT_TARGET
    student, student_seed = None, None
    for seed in STUDENT_SEEDS:
        print(f"training the student to mid-jump accuracy (seed {seed})...", flush=True)
        shutil.rmtree(out / "student", ignore_errors=True)
        result = train(out / "student", STUDENT, seed=seed, stop=lambda a: a >= lo,
                       give_up=StudentStall(lo), eval_every=25, eval_from=300, max_steps=1600)
        if result is not None and lo <= result[0] <= hi:
            student, student_seed = result, seed
            break
        shutil.rmtree(out / "student", ignore_errors=True)
        why = "stalled" if result is None else f"ended at accuracy {result[0]:.3f}, outside {STUDENT_TARGET}"
        print(f"  seed {seed} {why}; next seed", flush=True)
    if student is None:
        raise RuntimeError(f"no student seed of {STUDENT_SEEDS} reached the warm-start accuracy window "
                           f"{STUDENT_TARGET}")
    import transformers

    info = {
        "teacher_accuracy": teacher[0], "teacher_step": teacher[1], "teacher_seed": 0,
        "student_accuracy": student[0], "student_step": student[1], "student_seed": student_seed,
        "eval_prompts": EVAL_PROMPTS, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "seconds": round(time.time() - start),
        "command": "python -m megatron_opd.tasks.demo --retrain-warm-starts DIR",
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return train_pair_teacher(out)
