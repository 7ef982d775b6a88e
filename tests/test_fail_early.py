"""Errors before the expensive work: every argument and recipe field that can be wrong is checked
against the model's config.json (and the output path for writability) before any process group,
model or weight exists. Each test makes the expensive steps fail loudly if they are reached."""

import argparse
import os
from pathlib import Path

import pytest

from megatron_opd.testing.tiny import make_hf_model
from megatron_opd.utils import write_jsonl


class Reached(AssertionError):
    """The expensive part was reached before the error."""


def _forbid(monkeypatch, *targets):
    def reached(*args, **kwargs):
        raise Reached("reached the expensive part before refusing the arguments")
    for target in targets:
        monkeypatch.setattr(*target, reached)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("model") / "llama", model_type="llama")  # vocab 300


def _unwritable_dir(tmp_path) -> Path:
    """A directory this user cannot create files in (root writes anywhere but in /sys)."""
    import tempfile

    if os.geteuid() != 0:
        d = tmp_path / "read_only"
        d.mkdir()
        d.chmod(0o500)
        return d
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no directory this user cannot write to")


def _score_args(hf_dir, tmp_path, **changes):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [1, 2, 3]}])
    args = dict(model=str(hf_dir), input=str(inp), output=str(tmp_path / "out.jsonl"), top_k=0, tp=1, pp=1,
                micro_batch_tokens=4096, force=False, ep=1)
    args.update(changes)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("case", ["top_k_above_vocab", "micro_batch_tokens_zero", "empty_input", "output_parent_is_file",
                                  "output_is_a_directory", "output_not_writable"])
def test_score_refuses_bad_arguments_before_the_model_loads(hf_dir, tmp_path, monkeypatch, case):
    from megatron_opd import parallel
    from megatron_opd.commands import score

    _forbid(monkeypatch, (parallel, "init_distributed"), (parallel, "initialize_global_model_parallel"),
            (score, "load_model"))
    args = _score_args(hf_dir, tmp_path)
    if case == "top_k_above_vocab":
        args.top_k, expected = 301, "--top-k 301 must be in [0, 300] (the vocabulary of"
    elif case == "micro_batch_tokens_zero":
        args.micro_batch_tokens, expected = 0, "--micro-batch-tokens must be >= 1, got 0"
    elif case == "empty_input":
        Path(args.input).write_text("\n")
        expected = f"{args.input}: no sequences to score (the file is empty)"
    elif case == "output_parent_is_file":
        (tmp_path / "file").write_text("x")
        args.output = str(tmp_path / "file" / "sub" / "out.jsonl")
        expected = f"--output {args.output}: cannot be created: {tmp_path / 'file'} is a file, not a directory"
    elif case == "output_is_a_directory":
        args.output, expected = str(tmp_path), f"--output {tmp_path}: is a directory"
    else:
        args.output = str(_unwritable_dir(tmp_path) / "out.jsonl")
        expected = f"--output {args.output}: not writable (Permission denied"
    with pytest.raises(ValueError) as e:
        score.main(args)
    assert expected in str(e.value)


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_convert_refuses_an_unwritable_output_before_the_model_loads(hf_dir, tmp_path, monkeypatch, direction):
    from megatron_opd import parallel
    from megatron_opd.checkpoint import convert

    _forbid(monkeypatch, (parallel, "initialize_global_model_parallel"), (convert, "build_model"),
            (convert, "load_model"))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "converted"
    expected = f"output directory {out}: cannot be created: {tmp_path / 'file'} is a file, not a directory"
    layout = parallel.ParallelLayout(1, 1)
    with pytest.raises(ValueError, match=expected):
        if direction == "hf-to-mcore":
            convert.hf_to_mcore(hf_dir, out, layout=layout)
        else:
            convert.mcore_to_hf(tmp_path / "no-such-checkpoint", out, layout=layout)


@pytest.mark.parametrize("override,message", [
    ("loss.top_k=301", "loss.top_k=301 is larger than the student's vocabulary (300)"),
    ("rollout.stop_token_ids=[2, 300]", "rollout.stop_token_ids: 300 is not a token id of the student's vocabulary"),
    ("teacher.pp=4", "teacher: num_hidden_layers=2 is not divisible by pp=4"),
    ("train.run_dir={tmp}/file/run", "train.run_dir {tmp}/file/run: cannot be created: {tmp}/file is a file"),
    ("data.train_path={tmp}/empty.jsonl", "data.train_path: {tmp}/empty.jsonl is empty (no rows)"),
])
def test_trainer_refuses_fields_that_do_not_fit_the_models_before_loading_them(hf_dir, tmp_path, monkeypatch,
                                                                                override, message):
    import torch.distributed as dist

    from megatron_opd import parallel
    from megatron_opd.config import load_config
    from megatron_opd.train import loop
    from megatron_opd.train.loop import Trainer

    _forbid(monkeypatch, (parallel, "initialize_global_model_parallel"), (loop, "load_model"))
    monkeypatch.setattr(parallel, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt_ids": [4, 5, 6]}])
    overrides = [f"student.path={hf_dir}", f"teacher.path={hf_dir}", f"data.train_path={train}",
                 f"train.run_dir={tmp_path / 'run'}", "train.prompts_per_step=4", "rollout.stop_token_ids=[2]",
                 "data.max_prompt_tokens=64", override.format(tmp=tmp_path)]
    with pytest.raises(ValueError) as e:
        Trainer(load_config(None, overrides))
    assert message.format(tmp=tmp_path) in str(e.value)


def test_trainer_checks_every_phase_against_the_models_before_loading_them(hf_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    from megatron_opd import parallel
    from megatron_opd.config import load_config
    from megatron_opd.train import loop
    from megatron_opd.train.loop import Trainer

    _forbid(monkeypatch, (parallel, "initialize_global_model_parallel"), (loop, "load_model"))
    monkeypatch.setattr(parallel, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 4)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt_ids": [4, 5, 6]}])
    overrides = [f"student.path={hf_dir}", f"teacher.path={hf_dir}", f"data.train_path={train}",
                 f"train.run_dir={tmp_path / 'run'}", "train.prompts_per_step=4", "train.steps=4",
                 "train.phases=[{steps: 2, loss: {kind: cross_entropy}}, "
                 "{steps: 2, loss: {kind: reverse_kl_advantage, support: student_topk, top_k: 301}}]"]
    with pytest.raises(ValueError, match=r"train.phases\[1\]: loss.top_k=301 is larger than the student's "
                                         r"vocabulary \(300\)"):
        Trainer(load_config(None, overrides))
