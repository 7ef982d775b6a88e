"""`make demo`: on-policy distillation that visibly works, end to end, on a CPU in minutes.

1. Three-digit addition (megatron_opd/tasks/arithmetic.py), generated locally; a character-level
   tokenizer built with `tokenizers`.
2. Warm starts, trained here with plain PyTorch (cached in runs/demo/cache): a teacher that
   solves the task, and a student stopped in the middle of its learning jump (accuracy ~0.2),
   which is where distillation has something to transfer.
3. The same number of steps of `megatron-opd train` at TP=2 under torchrun, twice:
   OPD (reverse KL on the student's own samples, examples/demo_opd.yaml) and off-policy
   distillation (forward KL on the teacher's samples, examples/demo_offpolicy.yaml).
4. runs/demo/summary.json and runs/demo/curves.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_opd.tasks import arithmetic as task

RUN_DIR = Path(os.environ.get("MEGATRON_OPD_DEMO_DIR", "runs/demo"))
RECIPES = Path(__file__).resolve().parent.parent / "examples"
TEACHER = dict(hidden=128, heads=4, layers=2)
STUDENT = dict(hidden=64, heads=2, layers=2)
STUDENT_TARGET = (0.12, 0.45)  # warm-start accuracy window: mid-jump
# Tried in this order (seeds 5 and 6 jumped early in a measurement here; the stall rule moves on).
STUDENT_SEEDS = (5, 6, 1, 2, 3, 4, 7, 8)


def _encoded(split: str, num: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Token ids and answers of the split's first ``num`` pairs in the datasets' order (for
    "eval": the prompts of eval.jsonl, on which the trainer's runs are scored too)."""
    rows = torch.tensor(task.shuffled_pairs(split)[:num])
    a, b = rows[:, 0], rows[:, 1]
    return task.encode_pairs(a, b), [task.answer(x, y) for x, y in zip(a.tolist(), b.tolist())]


@torch.no_grad()
def accuracy(model, prompts: torch.Tensor, answers: list[str]) -> float:
    """Greedy exact match of the 4 answer digits (+ eos) on held-out prompts."""
    model.eval()
    ids = prompts[:, :8]
    for _ in range(5):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    model.train()
    want = torch.tensor([task.encode(a) + [task.EOS_ID] for a in answers])
    return (ids[:, 8:] == want).all(dim=1).float().mean().item()


def warm_start(out_dir: Path, shape: dict, *, seed: int, stop, give_up=None, max_steps: int = 2000,
               eval_every: int = 50, eval_from: int = 0) -> float | None:
    """Supervised training on the task until ``stop(accuracy)``; saves the most accurate weights
    seen (loss spikes happen at this learning rate) as an HF model + tokenizer and returns their
    accuracy. ``give_up(step, smoothed_loss, accuracy)`` abandons a run that will not get there
    (returns None, saves nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**task.llama_config(**shape))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    train, _ = _encoded("train")
    ev, answers = _encoded("eval", 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, 2000) / 2000)))
    g = torch.Generator().manual_seed(seed)
    acc, best, smooth = 0.0, (-1.0, None), None
    start = time.time()
    for step in range(1, max_steps + 1):
        batch = train[torch.randint(0, len(train), (256,), generator=g)]
        logits = model(batch[:, :-1]).logits[:, 7:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 8:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if step >= eval_from and step % eval_every == 0:
            acc = accuracy(model, ev, answers)
            print(f"  [{out_dir.name} seed {seed}] step {step} loss {smooth:.3f} held-out accuracy {acc:.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if acc > best[0]:
                best = (acc, {k: v.clone() for k, v in model.state_dict().items()})
            if stop(acc):
                break
            if give_up is not None and give_up(step, smooth, acc):
                return None
    if not stop(acc):
        model.load_state_dict(best[1])
        acc = best[0]
    model.save_pretrained(out_dir)
    task.make_tokenizer(out_dir)
    return acc


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


def prepare(cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    info_file = cache / "warm_start.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if all((cache / k / "config.json").is_file() for k in ("teacher", "student")):
            print(f"using cached warm starts in {cache}: {info}", flush=True)
            return info
    print("training the teacher (plain PyTorch, 2-4 min)...", flush=True)
    teacher_acc = warm_start(cache / "teacher", TEACHER, seed=0, stop=lambda a: a >= 0.98,
                             eval_every=100, eval_from=500)
    lo, hi = STUDENT_TARGET
    student_acc = None
    for seed in STUDENT_SEEDS:
        print(f"training the student to mid-jump accuracy (seed {seed})...", flush=True)
        shutil.rmtree(cache / "student", ignore_errors=True)
        acc = warm_start(cache / "student", STUDENT, seed=seed, stop=lambda a: a >= lo,
                         give_up=StudentStall(lo), eval_every=25, eval_from=300, max_steps=1600)
        if acc is not None and lo <= acc <= hi:
            student_acc = acc
            break
        shutil.rmtree(cache / "student", ignore_errors=True)
        why = "stalled" if acc is None else f"ended at accuracy {acc:.3f}, outside {STUDENT_TARGET}"
        print(f"  seed {seed} {why}; next seed", flush=True)
    if student_acc is None:
        raise RuntimeError(f"no student seed of {STUDENT_SEEDS} reached the warm-start accuracy window")
    info = {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc}
    info_file.write_text(json.dumps(info))
    return info


def run_trainer(name: str, recipe: Path, overrides: list[str]) -> list[dict]:
    run_dir = RUN_DIR / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "megatron_opd.cli",
           "train", "--config", str(recipe), f"train.run_dir={run_dir}", *overrides]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"{name} finished in {time.time() - start:.0f}s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(metrics: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["eval/accuracy"]) for m in metrics if "eval/accuracy" in m]


def plot(curves: dict, teacher_acc: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([s for s, _ in pts], [a for _, a in pts], marker="o", ms=3, label=label)
    ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("3-digit addition: student distillation at TP=2 (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    start = time.time()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    data_dir = RUN_DIR / "data"
    # 100k training prompts: more than the runs draw (steps x prompts per step)
    train_path, eval_path = task.write_datasets(data_dir, num_train=100_000)
    cache = RUN_DIR / "cache"
    info = prepare(cache)
    common = [f"student.path={cache / 'student'}", f"teacher.path={cache / 'teacher'}",
              f"data.train_path={train_path}", f"data.eval_path={eval_path}"]
    opd = run_trainer("opd", RECIPES / "demo_opd.yaml", common)
    off = run_trainer("offpolicy", RECIPES / "demo_offpolicy.yaml", common)
    curves = {"OPD (student samples, reverse KL)": curve(opd),
              "off-policy (teacher samples, forward KL)": curve(off)}
    before = curve(opd)[0][1] if curve(opd) else info["student_accuracy"]
    summary = {
        "teacher_accuracy": info["teacher_accuracy"],
        "student_accuracy_before": before,
        "student_accuracy_after_opd": curve(opd)[-1][1],
        "student_accuracy_after_offpolicy": curve(off)[-1][1],
        "steps": curve(opd)[-1][0],
        "opd_seconds": sum(m.get("time/step_s", 0) for m in opd),
        "offpolicy_seconds": sum(m.get("time/step_s", 0) for m in off),
        "max_trainer_rollout_logprob_diff": max(m.get("rollout/logprob_abs_diff_max", 0.0) for m in opd),
        "wall_seconds": time.time() - start,
    }
    gap = summary["teacher_accuracy"] - before
    if gap > 0:
        summary["gap_closed_opd"] = (summary["student_accuracy_after_opd"] - before) / gap
        summary["gap_closed_offpolicy"] = (summary["student_accuracy_after_offpolicy"] - before) / gap
    (RUN_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(curves, info["teacher_accuracy"], RUN_DIR / "curves.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {RUN_DIR / 'summary.json'} and {RUN_DIR / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
