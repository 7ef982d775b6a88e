"""The run config: sections validate themselves naming `section.field`, checks across sections,
recipes that derive from each other, dotted overrides, the LR schedule and sampling options a
section builds, and the dry run."""

import math
from pathlib import Path

import pytest

from megatron_opd.config import Config, OptimConfig, RolloutConfig, load_config
from megatron_opd.teacher.signals import Need

ROOT = Path(__file__).resolve().parent.parent
# A valid TP2 run on 2 ranks (paths are not opened by validation).
BASE = ["student.path=s", "teacher.path=t", "data.train_path=x", "student.tp=2", "teacher.tp=2",
        "train.prompts_per_step=16"]


def _validate(*overrides, world_size=2):
    load_config(None, BASE + list(overrides)).validate(world_size=world_size)


@pytest.mark.parametrize("override,message", [
    ("loss.kind=kl", "loss.kind must be one of"),
    ("loss.beta=1.5", "loss.beta must be in [0, 1]"),
    ("rollout.lmbda=-0.1", "rollout.lmbda must be in [0, 1]"),
    ("student.tp=3", "student: tp * pp = 3 * 1 = 3 does not divide the world size 2"),
    ("teacher.pp=4", "teacher: tp * pp = 2 * 4 = 8 does not divide the world size 2"),
    ("loss.support=teacher_topk", "loss.top_k must be >= 1 with loss.support='teacher_topk'"),
    ("teacher.tp=1", "teacher.tp (1) must equal student.tp (2)"),
    ("optim.lr=abc", "optim.lr: expected a number"),
    ("optim.decay=step", "optim.decay must be cosine, constant or linear"),
    ("optim.adam_beta2=1.0", "optim.adam_beta1/adam_beta2 must be in [0, 1)"),
    ("train.stepz=3", "unknown config field 'train.stepz'"),
    ("rollout.top_p=0.9", "set rollout.mismatch_threshold=null to sample with top-p"),
    ("rollout.environment=chess", "rollout.environment='chess' is unknown"),
    ("eval.metric=bleu", "eval.metric must be exact_match or boxed_math"),
    ("checkpoint.verify=crc", "checkpoint.verify must be hash, size or none"),
    ("data.train_path=", "data.train_path is required"),
])
def test_errors_name_the_field(override, message):
    with pytest.raises(ValueError) as e:
        _validate(override)
    assert message in str(e.value)


def test_every_student_replica_needs_a_prompt():
    with pytest.raises(ValueError, match="train.prompts_per_step=1 is smaller than the student's data-parallel size 2"):
        _validate("student.tp=1", "teacher.tp=1", "train.prompts_per_step=1")


@pytest.mark.parametrize("overrides,message", [
    (["loss.kind=forward_kl", "loss.top_k=4"], "a served teacher (teacher.served_url) gives top-k log-probs only"),
    (["loss.support=teacher_topk_input"], "loss.top_k must be >= 1"),
    (["loss.kind=sampled_reverse_kl", "loss.top_k=4", "teacher.temperature=2"],
     "teacher.temperature must be 1.0 with a served teacher"),
    (["loss.kind=sampled_reverse_kl", "loss.top_k=4", "rollout.lmbda=0.5", "rollout.offpolicy_source=teacher"],
     "rollout.offpolicy_source=teacher needs an in-process teacher"),
])
def test_a_served_teacher_must_fit_the_loss(overrides, message):
    with pytest.raises(ValueError) as e:
        _validate("teacher.path=", "teacher.served_url=http://h:8000", *overrides)
    assert message in str(e.value)


def test_valid_configs_pass_and_say_what_the_teacher_sends():
    _validate()
    _validate("teacher.path=", "teacher.served_url=http://h:8000", "loss.support=teacher_topk_input", "loss.top_k=4",
              "teacher.tp=8", "teacher.pp=3")  # a served teacher's layout is not this job's
    _validate("teacher.tp=1", "loss.support=teacher_topk_input", "loss.top_k=4")  # top-k: any teacher TP
    cfg = Config()
    assert cfg.loss.teacher_need == Need.LOGITS
    for fields, need in ((dict(fused_linear=True), Need.HIDDEN), (dict(support="teacher_topk_input"), Need.TOPK),
                         (dict(kind="sampled_reverse_kl", fused_linear=True), Need.TOKEN)):
        cfg = Config()
        for k, v in fields.items():
            setattr(cfg.loss, k, v)
        assert cfg.loss.teacher_need == need, fields


def test_learning_rate_schedule():
    def lrs(**kw):
        o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2, **kw)
        return [o.learning_rate(step, total_steps=6) for step in range(7)]

    assert lrs(decay="constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    linear = lrs(decay="linear")
    assert linear[:2] == [0.5, 1.0] and linear[2] == 1.0 and math.isclose(linear[6], 0.1)
    assert all(a > b for a, b in zip(linear[2:], linear[3:]))
    cosine = lrs(decay="cosine")
    assert cosine[2] == 1.0 and math.isclose(cosine[4], 0.55) and math.isclose(cosine[6], 0.1)


def test_rollout_section_builds_the_sampling_options():
    r = RolloutConfig(n=3, temperature=0.7, top_p=0.9, max_new_tokens=11, mismatch_threshold=None)
    s = r.sampling(seed=5, step=2, stop_token_ids=[2, 7])
    assert (s.n, s.temperature, s.top_p, s.max_new_tokens, s.stop_token_ids) == (3, 0.7, 0.9, 11, (2, 7))
    assert s.seed == 5 * 1_000_033 + 2 != r.sampling(seed=5, step=3, stop_token_ids=[]).seed


def test_recipes_derive_and_dry_run():
    from megatron_opd.cli import main

    recipe = ROOT / "examples" / "demo_offpolicy.yaml"
    cfg = load_config(recipe, ["student.path=s", "teacher.path=t", "data.train_path=x"])
    assert cfg.rollout.lmbda == 0.0 and cfg.loss.kind == "forward_kl"  # from the derived recipe
    assert cfg.optim.lr == 1e-3 and cfg.student.tp == 2  # from its base
    assert main(["train", "--config", str(recipe), "--dry-run", "--world-size", "2",
                 "student.path=s", "teacher.path=t", "data.train_path=x"]) == 0
