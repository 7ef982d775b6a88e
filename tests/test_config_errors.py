"""Bad model configs and parallel layouts give one-line errors that name the culprit."""

import json

import pytest

from megatron_opd.models import ArchConfig
from megatron_opd.parallel import ParallelLayout
from megatron_opd.testing.tiny import hf_config


def _write(tmp_path, **changes):
    data = hf_config("llama").to_dict()
    data.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_unknown_model_type(tmp_path):
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        ArchConfig.from_hf_dir(_write(tmp_path, model_type="gpt2"))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match=r"no config.json"):
        ArchConfig.from_hf_dir(tmp_path)


def test_unsupported_option_names_field(tmp_path):
    with pytest.raises(ValueError, match=r"attention_bias=True is not supported for llama"):
        ArchConfig.from_hf_dir(_write(tmp_path, attention_bias=True))
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type='yarn' is not supported"):
        ArchConfig.from_hf_dir(_write(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))


def test_heads_not_divisible_by_tp(tmp_path):
    arch = ArchConfig.from_hf_dir(_write(tmp_path))
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by tp=3"):
        arch.check_parallel(tp=3, pp=1)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 is not divisible by tp=4"):
        arch.check_parallel(tp=4, pp=1)
    with pytest.raises(ValueError, match=r"num_hidden_layers=2 is not divisible by pp=3"):
        arch.check_parallel(tp=1, pp=3)


def test_tp_pp_must_divide_world_size():
    with pytest.raises(ValueError, match=r"tp \* pp = 2 \* 2 = 4 does not divide the world size 6"):
        ParallelLayout(2, 2).data_parallel_size(6)
    assert ParallelLayout(2, 2).data_parallel_size(8) == 2


def test_cpu_refuses_what_megatron_cannot_do_there(tmp_path):
    """Without CUDA: the distributed optimizer is refused naming the setting (megatron-core would
    fail later, or silently misbehave); fp16 is refused everywhere."""
    import torch

    from megatron_opd.models.config import transformer_config
    from megatron_opd.parallel import cuda_available
    from megatron_opd.config import OptimConfig

    if cuda_available():
        pytest.skip("these refusals apply without CUDA only")
    arch = ArchConfig.from_hf_dir(_write(tmp_path))
    with pytest.raises(ValueError, match=r"params_dtype=torch.float16 is not supported \(supported: fp32"):
        transformer_config(arch, tp=1, pp=1, params_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"optim.use_distributed_optimizer=true needs CUDA"):
        OptimConfig(use_distributed_optimizer=True).check_device()
    config = transformer_config(arch, tp=1, pp=1, params_dtype=torch.float32)
    assert config.batch_p2p_comm is False and config.params_dtype == torch.float32


def test_model_dtype_names_the_field():
    from megatron_opd.config import load_config

    base = ["student.path=s", "teacher.path=t", "data.train_path=d"]
    load_config(None, base + ["student.dtype=bf16", "teacher.dtype=fp32"]).validate()
    with pytest.raises(ValueError, match=r"teacher.dtype must be one of fp32, bf16, got 'fp16'"):
        load_config(None, base + ["teacher.dtype=fp16"]).validate()


def test_mismatch_threshold_follows_the_student_dtype_unless_given():
    import torch

    from megatron_opd.config import MISMATCH_THRESHOLDS, load_config

    base = ["student.path=s", "teacher.path=t", "data.train_path=d"]
    auto = load_config(None, base).rollout
    assert auto.mismatch_threshold == "auto"
    assert auto.mismatch_threshold_for(torch.float32) == MISMATCH_THRESHOLDS[torch.float32] == 1e-3
    assert auto.mismatch_threshold_for(torch.bfloat16) == MISMATCH_THRESHOLDS[torch.bfloat16]
    assert load_config(None, base + ["rollout.mismatch_threshold=0.02"]).rollout.mismatch_threshold_for(
        torch.bfloat16) == 0.02
    assert load_config(None, base + ["rollout.mismatch_threshold=null"]).rollout.mismatch_threshold_for(
        torch.float32) is None
    with pytest.raises(ValueError, match=r"rollout.mismatch_threshold must be a number, auto or null, got 'often'"):
        load_config(None, base + ["rollout.mismatch_threshold=often"]).validate()


def test_rollout_tp_the_engine_cannot_split_names_the_field(tmp_path):
    from megatron_opd.config import config_from_dict

    arch = ArchConfig.from_hf_dir(_write(tmp_path))  # 4 query heads, 2 KV heads
    config_from_dict({"rollout": {"tp": 4}}).check_models(arch)  # K/V heads replicated by vLLM
    with pytest.raises(ValueError, match=r"rollout.tp=8: the engine cannot split num_attention_heads=4"):
        config_from_dict({"rollout": {"tp": 8}}).check_models(arch)
    with pytest.raises(ValueError, match=r"rollout.tp must be an integer >= 1, got 0"):
        config_from_dict({"rollout": {"tp": 0}}).rollout.validate()
