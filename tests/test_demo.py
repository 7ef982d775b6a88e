"""The demo's set-up path: shipped warm starts, both trainer runs, the summary and its verdict."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_opd.tasks import demo, warm_start

SUMMARY_KEYS = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after_opd",
                "student_accuracy_after_offpolicy", "threads", "wall_seconds", "meaningful", "problems")


def test_shipped_warm_starts_match_their_record():
    info = demo.check_warm_starts(demo.WARM_STARTS)
    assert info["teacher_accuracy_measured"] >= warm_start.TEACHER_TARGET
    lo, hi = warm_start.STUDENT_TARGET
    assert lo <= info["student_accuracy_measured"] <= hi
    assert info["teacher_accuracy_measured"] - info["student_accuracy_measured"] >= demo.MIN_TEACHER_LEAD


def test_shipped_pair_teacher_matches_its_record():
    """The cross-tokenizer demo's teacher reads the task in digit pairs and solves it."""
    info = demo.check_warm_starts(demo.WARM_STARTS, cross_tokenizer=True)
    assert info["teacher_accuracy_measured"] >= warm_start.TEACHER_TARGET
    assert info["teacher_accuracy_measured"] == pytest.approx(info["teacher_pairs_accuracy"], abs=1e-6)
    config = json.loads((demo.WARM_STARTS / warm_start.PAIR_TEACHER / "config.json").read_text())
    assert config["vocab_size"] == 114 and config["eos_token_id"] == 1  # not the student's vocabulary


def test_warm_starts_that_do_not_match_their_record_are_refused(tmp_path):
    copy = tmp_path / "ws"
    shutil.copytree(demo.WARM_STARTS, copy)
    info = json.loads((copy / warm_start.INFO_FILE).read_text())
    info["student_accuracy"] = 0.9
    (copy / warm_start.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="student: held-out accuracy .* recorded"):
        demo.check_warm_starts(copy)
    shutil.rmtree(copy / "teacher")
    with pytest.raises(ValueError, match="teacher: no warm-start model"):
        demo.check_warm_starts(copy)
    del info["teacher_pairs_accuracy"]
    info["student_accuracy"] = 0.348
    (copy / warm_start.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no teacher_pairs_accuracy recorded"):
        demo.check_warm_starts(copy, cross_tokenizer=True)


def _summary(teacher, before, after):
    return {"teacher_accuracy": teacher, "student_accuracy_before": before, "steps": 100,
            **({"gap_closed_opd": (after - before) / (teacher - before)} if teacher > before else {})}


def test_verdict():
    assert demo.problems(_summary(0.99, 0.29, 0.80)) == []
    assert "OPD closed 29%" in demo.problems(_summary(0.99, 0.29, 0.49))[0]
    found = demo.problems(_summary(0.40, 0.29, 0.30))
    assert "not clearly better" in found[0] and len(found) == 2
    assert "OPD closed nothing" in demo.problems(_summary(0.29, 0.29, 0.29))[-1]


@pytest.mark.vllm
def test_demo_end_to_end_short(tmp_path):
    """`make demo`'s path with one step per run: both runs train, the summary has its keys, and
    one step is (rightly) not reported as success."""
    out = tmp_path / "demo"
    env = {**os.environ, "MEGATRON_OPD_DEMO_DIR": str(out)}
    cmd = [sys.executable, "-m", "megatron_opd.tasks.demo", "train.steps=1", "train.prompts_per_step=32",
           "eval.num_prompts=64", "logging.tensorboard=false", "logging.progress_bar=false"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "THE DEMO DID NOT SHOW OPD WORKING" in r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary
    assert summary["steps"] == 1
    assert summary["meaningful"] is False and "OPD closed" in summary["problems"][0]
    assert (out / "curves.png").is_file()
    for run in ("opd", "offpolicy"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1]
