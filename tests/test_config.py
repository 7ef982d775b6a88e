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


# --- recipes: phases, buffered generation, the new objectives ----------------------------------------

TWO_PHASES = ("train.phases=[{steps: 2, rollout: {lmbda: 0, offpolicy_source: teacher}, loss: {kind: cross_entropy}}, "
              "{steps: 4, rollout: {steps_per_generation: 2}, loss: {kind: reverse_kl_advantage, "
              "support: student_topk, top_k: 16, topk_tail: false}}]")


def test_phases_override_their_sections_and_keep_the_rest():
    cfg = load_config(None, BASE + ["train.steps=6", "optim.lr=2e-6", TWO_PHASES])
    cfg.validate(world_size=2)
    first, second = cfg.phases()
    assert (first.start, first.end, second.start, second.end) == (0, 2, 2, 6)
    assert first.config.loss.kind == "cross_entropy" and first.config.rollout.uses_teacher_samples
    assert first.config.loss.teacher_need == Need.NONE and second.config.loss.teacher_need == Need.LOGITS
    assert second.config.loss.topk_tail is False and second.config.rollout.lmbda == 1.0
    assert second.config.optim.lr == first.config.optim.lr == 2e-6  # not overridden: the recipe's
    assert [second.generation_start(s) for s in range(2, 6)] == [2, 2, 4, 4]
    assert second.learning_rate(2) == 2e-6  # each phase's schedule starts at its first step
    assert len(Config().phases()) == 1 and Config().phases()[0].config is not None
    # the last phase's steps default to the rest of train.steps (dotted train.steps overrides keep working)
    rest = load_config(None, BASE + ["train.steps=9", "train.phases=[{steps: 2, loss: {kind: cross_entropy}}, {}]"])
    assert [(ph.start, ph.end) for ph in rest.phases()] == [(0, 2), (2, 9)]


@pytest.mark.parametrize("overrides,message", [
    (["train.steps=5", TWO_PHASES], "the phases' steps add up to 6, but train.steps is 5"),
    (["train.steps=2", "train.phases=[{steps: 2, data: {shuffle: false}}]"], r"train.phases\[0\]: unknown key"),
    (["train.steps=2", "train.phases=[{steps: 0}, {steps: 2}]"], r"train.phases\[0\].steps must be an integer >= 1"),
    (["train.steps=2", "train.phases=[{steps: 2}, {}]"], r"train.phases\[1\].steps must be an integer >= 1 \(the last "
                                                        r"phase's defaults to the rest of train.steps, 0\), got 0"),
    (["train.steps=2", "train.phases=[{steps: 2, loss: {kind: kl}}]"], r"train.phases\[0\]: loss.kind must be one of"),
    (["train.steps=2", "train.phases=[{steps: 2, loss: {knd: x}}]"], r"train.phases\[0\]: unknown config field 'loss.knd'"),
    (["train.steps=4", "train.phases=[{steps: 2}, {steps: 2, loss: {fused_linear: true}}]"],
     "loss.fused_linear may not change between phases"),
    (["train.steps=4", "train.phases=[{steps: 3}, {steps: 1, rollout: {steps_per_generation: 2}}]"],
     r"train.phases\[1\] starts at step 3, not a multiple of its rollout.steps_per_generation=2"),
    (["rollout.steps_per_generation=2", "checkpoint.every=3"],
     "checkpoint.every=3 must be a multiple of rollout.steps_per_generation=2"),
    (["rollout.steps_per_generation=0"], "rollout.steps_per_generation must be an integer >= 1"),
    (["loss.topk_tail=false"], "loss.topk_tail=false needs a top-k support"),
    (["loss.verifier=f1"], "loss.verifier must be empty or one of"),
    (["loss.correct_weight=-1"], "loss.correct_weight must be >= 0"),
])
def test_every_phase_is_validated_before_anything_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(*overrides)


def test_truncated_importance_is_on_with_buffered_generation():
    import torch
    from megatron_opd.config import LossConfig

    for kind in ("sampled_reverse_kl", "reverse_kl_advantage"):
        loss = LossConfig(kind=kind)
        assert loss.importance_cap_for(torch.float32) is None
        assert loss.importance_cap_for(torch.float32, steps_per_generation=2) == 2.0
    assert LossConfig(kind="reverse_kl").importance_cap_for(torch.float32, steps_per_generation=2) is None


@pytest.mark.slow  # rehearses a 1.5B step on fake tensors
def test_rethinking_opd_recipe_validates_and_dry_runs_at_its_world_size(capsys):
    from megatron_opd.cli import main

    recipe = ROOT / "examples" / "rethinking_opd_r1_1.5b.yaml"
    models = [f"student.path={ROOT / 'examples/model_configs/qwen2.5-1.5b'}",
              f"teacher.path={ROOT / 'examples/model_configs/qwen2.5-1.5b'}"]
    assert main(["train", "--config", str(recipe), "--dry-run", "--world-size", "8", *models]) == 0
    out = capsys.readouterr().out
    assert "phase 0: steps 1-50, loss.kind=cross_entropy" in out
    assert "phase 1: steps 51-250, loss.kind=reverse_kl_advantage" in out
    cold, opd = load_config(recipe, models).phases()
    assert cold.config.rollout.lmbda == 0 and cold.config.rollout.offpolicy_source == "teacher"
    loss, rollout = opd.config.loss, opd.config.rollout
    assert (loss.kind, loss.support, loss.top_k, loss.topk_tail) == ("reverse_kl_advantage", "student_topk", 16, False)
    assert (rollout.n, rollout.temperature, rollout.lmbda, opd.config.teacher.temperature) == (4, 1.0, 1.0, 1.0)
    assert opd.config.optim.lr == 1e-6 and opd.config.optim.decay == "constant"
    assert main(["train", "--config", str(recipe), "--dry-run", "--world-size", "7", *models]) == 2
    # the demo's toy-scale version (python -m megatron_opd.tasks.demo --with-rethinking)
    demo = ROOT / "examples" / "demo_rethinking_opd.yaml"
    warm = ROOT / "megatron_opd" / "tasks" / "warm_starts"
    assert main(["train", "--config", str(demo), "--dry-run", "--world-size", "2", f"student.path={warm / 'student'}",
                 f"teacher.path={warm / 'teacher'}", "data.train_path=x"]) == 0
