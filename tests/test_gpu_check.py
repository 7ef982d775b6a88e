"""`make gpu-check` on a machine without CUDA, and the parts of it that do not need a GPU: it exits
2 saying why, its report lists every cuda-marked test, and the wheels it carries are the pinned ones."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == gpu_check.EXIT_NO_CUDA == 2
    assert "no CUDA device here" in proc.stderr and "nothing was run" in proc.stderr


def test_carries_the_megatron_core_the_code_is_checked_against():
    assert f"megatron-core=={version('megatron-core')}" in gpu_check.WHEELS


def test_report_lists_every_cuda_test_with_why_it_did_not_run(tmp_path):
    """The same pytest invocation as on a GPU machine; here every test is skipped, and the table
    says so for each."""
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_gpu_check.py" not in files
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q",
                    f"--junitxml={junit}", "-o", "junit_family=xunit1", *files], cwd=ROOT,
                   capture_output=True, timeout=300, check=False)
    rows, failed = gpu_check.summary(junit)
    names = {r[0] for r in rows}
    assert {"test_fused_linear_loss_on_cuda_matches_cpu_float64", "test_environment",
            "test_trainer_bf16_step_with_nccl_at_a_152k_vocabulary[fused_linear]"} <= names
    assert failed == 0 and all(r[1] == "not run" and r[3] == "needs a CUDA device" for r in rows)


def test_engine_memory_fraction_is_what_it_needs_of_the_whole_gpu():
    """vLLM on a GPU the models already use: the fraction is the engine's need over the GPU's total
    (vLLM checks it against the free memory at start-up), and a need above what is free is refused
    before vLLM starts, naming the setting."""
    from megatron_opd.rollout.engine import GiB, gpu_memory_fraction

    assert gpu_memory_fraction(engine_bytes=30 * GiB, free_bytes=60 * GiB, total_bytes=140 * GiB) == 30 / 140
    with pytest.raises(ValueError, match=r"needs 70.0 GiB .* but 60.0 of 140.0 GiB are free after the models: "
                                         r"lower rollout.kv_cache_gb"):
        gpu_memory_fraction(engine_bytes=70 * GiB, free_bytes=60 * GiB, total_bytes=140 * GiB)
