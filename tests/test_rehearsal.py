"""The dry run's rehearsal of the GPU step on fake tensors (train/rehearsal.py): the real step of
each rank role at a fake world size, its memory beside the analytic estimate, and a host tensor
planted where the step meets a collective named by file and line."""

import json
import types
from pathlib import Path

import pytest
import torch

from megatron_opd.config import load_config
from megatron_opd.models.config import ArchConfig
from megatron_opd.teacher.megatron import MegatronTeacher
from megatron_opd.testing.tiny import hf_config
from megatron_opd.train import metrics, optim
from megatron_opd.train.dry_run import rehearsal_table
from megatron_opd.train.memory import estimate
from megatron_opd.train.rehearsal import DeviceError, rehearsal_ranks, rehearse_rank

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def _config_dir(path: Path, config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = config if isinstance(config, dict) else config.to_dict()
    (path / "config.json").write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny student and a wider teacher (config.json only: the rehearsal needs no weights)."""
    root = tmp_path_factory.mktemp("rehearsal")
    student = _config_dir(root / "student", hf_config("llama", num_hidden_layers=4, vocab_size=301))
    teacher = _config_dir(root / "teacher", hf_config("llama", num_hidden_layers=4, vocab_size=301, hidden_size=128,
                                                      intermediate_size=200))
    return student, teacher


def _cfg(student, teacher, *overrides):
    return load_config(None, [f"student.path={student}", f"teacher.path={teacher}", "data.train_path=x",
                              "student.tp=2", "student.pp=2", "teacher.tp=2", "teacher.pp=2", "student.dtype=bf16",
                              "teacher.dtype=bf16", "train.prompts_per_step=16", "data.micro_batch_tokens=96",
                              "data.max_prompt_tokens=8", "rollout.max_new_tokens=20", *overrides])


def _close(measured: float, estimated: float, rel: float) -> bool:
    return abs(measured - estimated) <= rel * estimated


def test_a_tp2_pp2_layout_of_8_fake_ranks_rehearses_every_role(tiny):
    student, teacher = tiny
    cfg = _cfg(student, teacher)
    cfg.validate(world_size=8)
    s_arch, t_arch = ArchConfig.from_hf_dir(student), ArchConfig.from_hf_dir(teacher)
    ranks = rehearsal_ranks(cfg, 8)
    assert ranks == [0, 4]  # student stages 0 and 1; the teacher's stages coincide
    # first, a middle and the last student stage; a teacher stage no student rank holds
    assert rehearsal_ranks(_cfg(student, teacher, "student.pp=4", "teacher.pp=1"), 16) == [0, 4, 12]
    assert rehearsal_ranks(_cfg(student, teacher, "student.pp=1", "teacher.pp=2"), 8) == [0, 4]
    reports = [rehearse_rank(cfg, s_arch, t_arch, rank=r, world_size=8) for r in ranks]
    assert [(r.student_stage, r.teacher_stage) for r in reports] == [(0, 0), (1, 1)]
    rows = estimate(cfg, s_arch, t_arch, world_size=8)
    for r in reports:
        m = {k: v * GiB for k, v in r.measured.items()}
        assert m["peak of the step"] > 0 and m["student update peak"] > 0 and m["teacher forward peak"] > 0
        assert m["weight sync peak"] > 0
    # The estimate counts the busiest stage (here the first: embeddings and pp micro-batches in flight).
    first = {k: v * GiB for k, v in reports[0].measured.items()}
    s, t = rows[0], rows[1]
    for part, estimated in (("student parameters", s.parameters), ("student gradients", s.gradients),
                            ("student optimizer", s.optimizer), ("teacher parameters", t.parameters)):
        assert _close(first[part], estimated * GiB, 0.01), (part, first[part], estimated * GiB)
    text, _ = rehearsal_table(reports, rows, gpu_memory_gb=80)
    assert "rank 0 (student stage 0, teacher stage 0)" in text and "rank 4 (student stage 1, teacher stage 1)" in text
    assert "student activations + logits (peak)" in text and "teacher forward (peak)" in text


def test_memory_of_the_qwen_recipe_shapes_matches_the_estimate(tmp_path):
    """The Qwen2.5 1.5B-from-7B recipe's shapes (152k vocabulary, TP2, bf16, fused-linear loss) with
    two layers per model and 2048-token THD packs of two sequences: every part
    within 20 % of the estimate."""
    configs = ROOT / "examples" / "model_configs"
    models = []
    for name in ("qwen2.5-1.5b", "qwen2.5-7b"):
        data = json.loads((configs / name / "config.json").read_text())
        models.append(_config_dir(tmp_path / name, dict(data, num_hidden_layers=2)))
    cfg = load_config(str(ROOT / "examples" / "qwen2.5_1.5b_from_7b_math.yaml"),
                      [f"student.path={models[0]}", f"teacher.path={models[1]}", "data.micro_batch_tokens=2048",
                       "rollout.max_new_tokens=512"])
    cfg.validate(world_size=8)
    s_arch, t_arch = ArchConfig.from_hf_dir(models[0]), ArchConfig.from_hf_dir(models[1])
    report = rehearse_rank(cfg, s_arch, t_arch, rank=0, world_size=8)
    s, t = estimate(cfg, s_arch, t_arch, world_size=8)
    m = report.measured
    pairs = {"student parameters": s.parameters, "student gradients": s.gradients, "student optimizer": s.optimizer,
             "student update peak": s.activations + s.logits, "teacher parameters": t.parameters,
             "teacher forward peak": t.activations + t.logits}
    off = {k: (round(m[k], 3), round(v, 3)) for k, v in pairs.items() if not _close(m[k], v, 0.2)}
    assert not off, off


class _HostDevice:
    """A stand-in for the `parallel` module as the code read before its device discipline: every
    tensor it builds lands on the host."""

    def __init__(self, real):
        self._real = real

    def device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self._real, name)


def _host_receive_buffer(self, key, L):
    real = MegatronTeacher._real_empty(self, key, L)
    return torch.empty(real.shape, dtype=real.dtype)  # the receive buffer, on the host


@pytest.mark.parametrize("plant,site", [
    ("optim", "megatron_opd/train/optim.py"),        # the non-finite check's flag (once torch.ones(1))
    ("metrics", "megatron_opd/train/metrics.py"),    # the step's metric sums
    ("teacher", "megatron_opd/teacher/megatron.py"),  # the teacher's receive buffers
])
def test_a_host_tensor_in_a_collective_of_the_step_is_named(tiny, monkeypatch, capfd, plant, site):
    student, teacher = tiny
    if plant == "optim":
        monkeypatch.setattr(optim, "parallel", _HostDevice(optim.parallel))
    elif plant == "metrics":
        monkeypatch.setattr(metrics, "parallel", _HostDevice(metrics.parallel))
    else:
        monkeypatch.setattr(MegatronTeacher, "_real_empty", MegatronTeacher._empty, raising=False)
        monkeypatch.setattr(MegatronTeacher, "_empty", _host_receive_buffer)
    # teacher at PP1: its replicas differ from the student's, so results travel between ranks
    cfg = _cfg(student, teacher, "teacher.pp=1")
    cfg.validate(world_size=8)
    if plant == "optim":  # through the command line: the dry run fails naming the place
        from megatron_opd.cli import main

        overrides = [f"student.path={student}", f"teacher.path={teacher}", "data.train_path=x", "student.tp=2",
                     "student.pp=2", "teacher.tp=2", "teacher.pp=1", "student.dtype=bf16", "teacher.dtype=bf16",
                     "train.prompts_per_step=16", "data.micro_batch_tokens=96", "data.max_prompt_tokens=8",
                     "rollout.max_new_tokens=20"]
        assert main(["train", "--dry-run", "--world-size", "8", *overrides]) == 1
        message = capfd.readouterr().err
    else:
        with pytest.raises(DeviceError) as e:
            rehearse_rank(cfg, ArchConfig.from_hf_dir(student), ArchConfig.from_hf_dir(teacher), rank=4, world_size=8)
        message = str(e.value)
    assert site + ":" in message and "got a cpu tensor" in message, message
    assert "the compute device" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_is_rehearsed_per_sequence(dtype):
    """A THD pack on fake tensors: the host reads the pack's real cu_seqlens back (as megatron's
    RoPE and our attention do), attention runs once per sequence, and what it keeps for the
    backward is the per-sequence scores the estimate counts where the math kernel runs (fp32), or
    none where flash attention runs (bf16) - never a [pack, pack] score matrix."""
    from megatron_opd import parallel
    from megatron_opd.models.packing import packed_seq_params
    from megatron_opd.models.varlen import varlen_attention
    from megatron_opd.train.memory import MATH_ATTENTION_KEPT, attention_score_bytes
    from megatron_opd.train.rehearsal import fake_world

    lengths, heads, groups, dim = [300, 200, 100], 4, 2, 16
    arch = types.SimpleNamespace(num_attention_heads=heads)
    per_sequence = attention_score_bytes(arch, tp=1, lengths=lengths, per_element=MATH_ATTENTION_KEPT)
    per_pack = attention_score_bytes(arch, tp=1, lengths=[sum(lengths)], per_element=MATH_ATTENTION_KEPT)
    with fake_world(rank=0, world_size=1) as memory:
        device = parallel.device()
        cu = packed_seq_params(lengths, device=device).cu_seqlens_q
        assert cu.device == device and cu.tolist() == [0, 300, 500, 600]
        assert ((cu[1:] - cu[:-1]) // 1).tolist() == lengths and int(cu[-1]) == 600
        t = sum(lengths)
        q = torch.zeros(t, heads, dim, dtype=dtype, device=device, requires_grad=True)
        k, v = (torch.zeros(t, groups, dim, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        live = memory.live
        out = varlen_attention(q, k, v, cu.tolist(), scale=dim ** -0.5)
        kept = memory.live - live
        assert out.shape == (t, heads, dim)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    if dtype == torch.float32:
        assert _close(kept, per_sequence, 0.2) and kept < per_pack / 2, (kept, per_sequence, per_pack)
    else:
        assert kept < per_sequence / 10, (kept, per_sequence)
