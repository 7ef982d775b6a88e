"""Running at cluster scale and surviving faults, on CPU with real processes: Slurm templates,
fail-fast ranks, kill-during-checkpoint + resume, checkpoint integrity, non-finite guard, and the
layout dry-run of a 64-GPU recipe."""

import json
import os
import shutil
import signal
import subprocess
import sys
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_task import base_overrides, losses

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "examples" / "slurm"
FAULT_DRILLS = Path(__file__).resolve().parent / "fault_drills.py"


def _torchrun_cmd(args: list, *, nproc: int = 2, max_restarts: int = 0, fault: tuple | None = None) -> list:
    """torchrun of the command line; with ``fault`` = (kind, step, rank), of it under a fault drill."""
    entry = ["-m", "megatron_opd.cli"]
    if fault is not None:
        kind, step, rank = fault
        entry = [str(FAULT_DRILLS), "--fault", kind, "--step", str(step), "--rank", str(rank)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", *entry, *args]


def _torchrun(args: list, *, nproc: int = 2, max_restarts: int = 0, fault: tuple | None = None,
              timeout: float = 300, env=None):
    return subprocess.run(_torchrun_cmd(args, nproc=nproc, max_restarts=max_restarts, fault=fault),
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _seconds_after(cmd: list, marker: str, *, env: dict, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd``; (exit code, stderr, seconds from the first stderr line holding ``marker`` to
    the exit of every process that holds the job's stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines, seen = [], None
    try:
        for line in proc.stderr:  # until every rank and torchrun have closed it
            lines.append(line)
            if seen is None and marker in line:
                seen = time.monotonic()
        proc.wait()
    finally:
        watchdog.cancel()
    assert seen is not None, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines), time.monotonic() - seen


# --- Slurm templates ------------------------------------------------------------------------------

def _fake_slurm(bin_dir: Path, log: Path, *, execute: bool, srun_seconds: float = 0) -> dict:
    """Stub `scontrol` and `srun` that record their arguments (and srun runs its command, or
    takes ``srun_seconds``)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f"echo \"scontrol $*\" >> {log}\n"
        "if [ \"$1 $2\" = \"show hostnames\" ]; then printf 'gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n'; fi\n")
    run = 'exec "${@:$i}"' if execute else f"sleep {srun_seconds}; exit 0"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"printf 'srun' >> {log}; for a in \"$@\"; do printf ' %q' \"$a\" >> {log}; done; echo >> {log}\n"
        # skip srun's own options, then run (or not) the command
        "i=1; for a in \"$@\"; do case \"$a\" in --*) i=$((i+1));; *) break;; esac; done\n"
        f"{run}\n")
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "opd-test",
            "SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "8",
            "PYTHON": sys.executable}


def test_multi_node_template_renders_torchrun_with_rendezvous_on_first_node(tmp_path):
    log = tmp_path / "calls.log"
    env = _fake_slurm(tmp_path / "bin", log, execute=False)
    proc = subprocess.run(["bash", str(SLURM / "train_multi_node.sbatch"), "examples/recipe.yaml",
                           "optim.lr=1e-6", "rollout.stop_token_ids=[1, 2]"],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    assert "scontrol show hostnames gpu-node-[07-09]" in calls
    srun = [line for line in calls.splitlines() if line.startswith("srun")][0]
    assert "--ntasks=3" in srun and "--ntasks-per-node=1" in srun
    for expected in ("--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu-node-07:29500", "--rdzv-id=4242", "-m megatron_opd.cli train",
                     "train.run_dir=", "checkpoint.resume=auto", "optim.lr=1e-6"):
        assert expected in srun.replace("\\ ", " "), (expected, srun)
    assert "rollout.stop_token_ids=\\[1,\\ 2\\]" in srun or "stop_token_ids=[1, 2]" in srun.replace("\\", "")


@pytest.mark.parametrize("template", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_train_templates_requeue_when_the_time_limit_nears(tmp_path, template):
    """Slurm's USR1 (--signal=B:USR1@300) makes the script requeue its job, not die."""
    log = tmp_path / "calls.log"
    env = _fake_slurm(tmp_path / "bin", log, execute=False, srun_seconds=3)
    proc = subprocess.Popen(["bash", str(SLURM / template), "examples/recipe.yaml"], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (log.is_file() and "srun" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr  # waited for srun instead of dying on the signal
    assert "scontrol requeue 4242" in log.read_text() and "requeueing job 4242" in stderr


def test_convert_template_sizes_the_launch_from_tp_and_pp(tmp_path):
    log = tmp_path / "calls.log"
    env = _fake_slurm(tmp_path / "bin", log, execute=False)
    proc = subprocess.run(["bash", str(SLURM / "convert.sbatch"), "hf-to-mcore", "--hf", "/m", "--out", "/o",
                           "--tp", "4", "--pp", "2"], cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    srun = log.read_text().splitlines()[0]
    assert "--nproc-per-node=8" in srun and "convert hf-to-mcore --hf /m --out /o --tp 4 --pp 2" in srun.replace("\\", "")


@pytest.mark.vllm
def test_single_node_template_runs_the_tiny_recipe(task_dir, tmp_path):
    log = tmp_path / "calls.log"
    env = _fake_slurm(tmp_path / "bin", log, execute=True)
    env.update(GPUS_PER_NODE="2", RUN_DIR=str(tmp_path / "run"))
    overrides = [o for o in base_overrides(task_dir, tmp_path / "ignored", 2) if not o.startswith("train.run_dir")]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("logging: {progress_bar: false}\n")
    proc = subprocess.run(["bash", str(SLURM / "train_single_node.sbatch"), str(recipe), *overrides],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun = log.read_text().splitlines()[0]
    assert "--standalone" in srun and "--nproc-per-node=2" in srun
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


# --- fail fast ------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_rank_raising_mid_step_stops_every_rank_quickly(task_dir, tmp_path):
    error_file = tmp_path / "error.json"
    args = ["train", *base_overrides(task_dir, tmp_path / "run", 3)]
    code, stderr, after_fault = _seconds_after(_torchrun_cmd(args, fault=("raise", 1, 1)),
                                               "rank 1 failed: RuntimeError: injected fault",
                                               env={"TORCHELASTIC_ERROR_FILE": str(error_file)}, timeout=300)
    assert code != 0
    # torchrun's summary names the root cause rank and the exception; rank 0, waiting in a
    # collective for rank 1, is stopped rather than left hanging
    assert "rank      : 1" in stderr or "rank: 1" in stderr
    assert "RuntimeError: injected fault at step 1 on rank 1" in stderr
    assert after_fault < 60, after_fault
    assert "injected fault" in json.loads(error_file.read_text())["message"]["message"]


# --- a rank killed mid-save: no orphan, the lost rank named, nothing left behind ------------------

def _job_processes(token: bytes) -> list[int]:
    """Live processes whose environment holds ``token`` (every process of a job inherits it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_rank_killed_mid_save_leaves_no_process_and_is_named(task_dir, tmp_path):
    """The probe's case: rank 1 of `convert hf-to-mcore` SIGKILLed inside megatron's file writer.
    (A killed rank 0's staging directory is removed at the next start: test_crash_recovery.py.)"""
    token = f"job-{uuid.uuid4().hex}"
    out = tmp_path / "converted"
    cmd = _torchrun_cmd(["convert", "hf-to-mcore", "--hf", str(task_dir / "student"), "--out", str(out),
                         "--tp", "2"], fault=("kill_mid_write", 0, 1))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MEGATRON_OPD_TEST_JOB": token})
    lines, killed = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "fault drill: SIGKILL rank 1" in line:
                killed.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert killed.wait(300), "".join(lines)[-3000:]
        deadline = time.monotonic() + 10
        while _job_processes(token.encode()) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = _job_processes(token.encode())
        assert survivors == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in survivors]
        proc.wait(timeout=30)
        reader.join(timeout=30)
    finally:
        for pid in _job_processes(token.encode()):
            os.kill(pid, signal.SIGKILL)
    stderr = "".join(lines)
    assert proc.returncode != 0
    pid = re.search(r"fault drill: SIGKILL rank 1 \(pid (\d+)\)", stderr).group(1)
    # the survivor names the lost rank; torchrun's root cause is rank 1, not rank 0
    assert re.search(rf"rank 0 stopped: lost rank 1 \(pid {pid} on \S+ has exited\)", stderr), stderr[-3000:]
    root_cause = stderr[stderr.index("Root Cause"):][:600]
    assert re.search(r"rank\s*:\s*1 ", root_cause), root_cause
    # nothing published, and rank 0 removed its staging directory and lock on the way out
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- kill during checkpoint, resume ---------------------------------------------------------------

CKPT_EVERY_STEP = ["checkpoint.every=1", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def reference_run(task_dir, tmp_path_factory):
    """3 uninterrupted steps, a checkpoint after each: the losses every recovery must reproduce."""
    ref = tmp_path_factory.mktemp("reference")
    proc = _torchrun(["train", *base_overrides(task_dir, ref, 3), *CKPT_EVERY_STEP])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.vllm
def test_sigkill_during_checkpoint_write_resumes_from_previous_and_continues_identically(
        task_dir, tmp_path, reference_run):
    run = tmp_path / "run"
    common = CKPT_EVERY_STEP
    killed = _torchrun(["train", *base_overrides(task_dir, run, 3), *common], fault=("kill_in_checkpoint", 2, 0))
    assert killed.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000001"  # step 2 never published
    assert list(ckpts.glob(".staging-*"))  # the half-written one is there, and ignored
    resumed = _torchrun(["train", *base_overrides(task_dir, run, 3), *common])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000001" in resumed.stderr
    assert not list(ckpts.glob(".staging-*"))  # stale staging cleaned
    a, b = losses(reference_run), losses(run)
    assert a[2] == b[2] and a[3] == b[3]  # the curve continues bit-identically
    steps = _steps_logged(run)
    assert sorted(set(steps)) == steps  # step 2, logged before the kill, is not logged twice
    # keep_last=2 pruned step 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000003"]


@pytest.mark.vllm
def test_torchrun_restart_resumes_from_the_last_checkpoint(task_dir, tmp_path, reference_run):
    """A rank raising in step 2 with --max-restarts=1: torchrun restarts the job, which resumes
    from step 1's checkpoint and finishes with the uninterrupted run's losses."""
    run = tmp_path / "run"
    proc = _torchrun(["train", *base_overrides(task_dir, run, 3), *CKPT_EVERY_STEP], fault=("raise", 1, 1),
                     max_restarts=1, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected fault" in proc.stderr and "resumed from" in proc.stderr
    a, b = losses(reference_run), losses(run)
    assert a == b
    assert _steps_logged(run) == [1, 2, 3]


# --- checkpoint integrity -------------------------------------------------------------------------

@pytest.mark.vllm
def test_damaged_checkpoint_is_refused_naming_the_file(task_dir, tmp_path, reference_run):
    """A resumed job refuses a corrupted checkpoint file, naming it (truncated and missing files:
    test_checkpoint_files.py)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    ckpt = run / "checkpoints" / "step_00000003"
    victim = sorted((ckpt / "model").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = _torchrun(["train", *base_overrides(task_dir, run, 4), *CKPT_EVERY_STEP])
    assert proc.returncode != 0
    assert str(victim) in proc.stderr and "corrupted" in proc.stderr


@pytest.mark.vllm
def test_training_checkpoint_exports_to_hf(task_dir, tmp_path, reference_run):
    """tools/convert_mcore_to_hf.py on a trainer checkpoint: transformers loads the student with
    its tokenizer, and its log-probs are those the trainer's model gives (`megatron-opd score`
    on the checkpoint itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, hf = reference_run / "checkpoints" / "step_00000003", tmp_path / "hf"
    tool = ROOT / "tools" / "convert_mcore_to_hf.py"
    proc = subprocess.run([sys.executable, str(tool), "--mcore", str(ckpt), "--out", str(hf)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seqs = [[4, 5, 6, 12, 7, 8, 9, 13, 3, 4, 5, 2, 1], [11, 2, 3, 12, 9, 9, 9, 13, 1]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "score", "--model", str(ckpt),
                           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = [json.loads(line)["logprobs"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(str(hf)).decode([4, 5, 6, 12]) == "234+"
    for s, lp in zip(seqs, trainer):
        ref = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].double(), -1)
        ref = ref.gather(-1, torch.tensor(s[1:]).unsqueeze(-1))[:, 0]
        assert (ref - torch.tensor(lp, dtype=torch.float64)).abs().max() <= 1e-4


# --- numerical guard ------------------------------------------------------------------------------

def _nan_run(task_root: str, run_dir: str) -> dict:
    from fault_drills import inject

    from megatron_opd.config import load_config
    from megatron_opd.train.loop import Trainer
    from megatron_opd.train.optim import NonFiniteError

    inject("nan", steps=(1, 3, 4), rank=1)
    ov = base_overrides(Path(task_root), Path(run_dir), 5) + ["train.max_nonfinite_steps=2"]
    trainer = Trainer(load_config(None, ov))
    try:
        trainer.train()
        stopped = False
    except NonFiniteError:
        stopped = True
    finally:
        trainer.close()
    return {"stopped": stopped}


@pytest.mark.vllm
def test_nonfinite_gradient_skips_the_step_and_stops_after_the_limit(task_dir, tmp_path):
    """NaN gradients on one rank in steps 2, 4 and 5 with train.max_nonfinite_steps=2: step 2 is
    skipped on every rank, step 3 trains again, and the second NaN step in a row stops the run."""
    out = run_distributed(_nan_run, 2, str(task_dir), str(tmp_path), timeout=600)
    assert out[0] == {"stopped": True}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["skipped_steps"] for r in rows} == {1: 0, 2: 1, 3: 1, 4: 2}


# --- layout dry-run -------------------------------------------------------------------------------

def test_dry_run_of_a_64_gpu_recipe_prints_layout_and_memory(capsys):
    """The command line's dry run, in this process (it starts nothing distributed)."""
    from megatron_opd.cli import main

    recipe = ROOT / "examples" / "llama3.1_8b_from_70b_tp8pp2.yaml"
    models = [f"student.path={ROOT / 'examples/model_configs/llama-3.1-8b'}",
              f"teacher.path={ROOT / 'examples/model_configs/llama-3.1-70b'}"]

    def dry_run(world: int, *overrides: str) -> int:
        return main(["train", "--config", str(recipe), "--dry-run", "--world-size", str(world), *models, *overrides])

    assert dry_run(64) == 0
    out = capsys.readouterr().out
    assert "student: tp=8 pp=1 dp=8" in out and "teacher: tp=8 pp=2 dp=4" in out
    for column in ("parameters", "gradients", "optimizer", "activations", "logits", "total"):
        assert column in out
    assert "fits in 80 GiB" in out and "micro-batches of data.micro_batch_tokens=16384" in out
    assert "teacher signals kept on the host" in out
    assert dry_run(64, "rollout.kv_cache_gb=200", "loss.fused_linear=false", "train.host_memory_gb=256") == 1
    big = capsys.readouterr().out
    assert "DOES NOT FIT in 80 GiB" in big and "to fit: a smaller rollout.kv_cache_gb" in big
    assert "DOES NOT FIT in 256 GiB (train.host_memory_gb)" in big
    assert "to fit: loss.fused_linear=true" in big
    assert dry_run(60) == 2
    assert "does not divide the world size 60" in capsys.readouterr().err
