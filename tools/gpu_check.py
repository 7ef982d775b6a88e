"""The one-command check for a GPU machine (`make gpu-check`): runs every `cuda`-marked test and
prints one summary table. Never faked: without CUDA it says so and exits 2.

What the GPU machine lacks (megatron-core and the small packages around it) travels as wheels
downloaded beforehand on a machine with network access (`make gpu-wheels`, into
``build/gpu-wheels``); they are installed here with ``pip install --no-index --target`` into
``build/gpu-check/site``, only those whose module does not already import.

    python tools/gpu_check.py                 # run the check (exit 0: all ran passed, 1: a failure, 2: no CUDA)
    python tools/gpu_check.py --download-wheels build/gpu-wheels   # on a machine with network access
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Distribution -> the module that shows it is installed. megatron-core is pinned exactly (the
# version the code and its CPU shims are checked against); its own dependencies are torch, numpy
# and packaging; pyyaml reads the recipes.
WHEELS = {"megatron-core==0.16.1": "megatron.core", "numpy": "numpy", "packaging": "packaging",
          "pyyaml": "yaml"}
PYTHON_VERSION = "3.12"
# pip does not widen an explicit --platform to older manylinux tags: list them.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
    "manylinux1_x86_64", "linux_x86_64"]
TIME_LIMIT_S = 8 * 60
EXIT_NO_CUDA = 2


def download_wheels(out_dir: Path) -> int:
    """pip download the cp312 manylinux wheels of WHEELS (no dependencies: the list is complete)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(out_dir)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    rc = subprocess.call(cmd + list(WHEELS))
    if rc == 0:
        total = sum(p.stat().st_size for p in out_dir.glob("*.whl"))
        print(f"{out_dir}: {len(list(out_dir.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")
    return rc


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def install_missing(wheel_dir: Path, target: Path) -> list[str]:
    """Install the carried wheels whose module does not import (``--no-index``: no network);
    returns what was installed. ``target`` must then be on the path."""
    missing = [dist for dist, module in WHEELS.items() if not _importable(module)]
    if not missing:
        return []
    wheels = []
    for dist in missing:
        name = dist.split("==")[0].replace("-", "_").lower()
        found = sorted(p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(name + "-"))
        if not found:
            raise SystemExit(f"gpu-check: {dist} is not installed and there is no wheel for it in {wheel_dir} "
                             "(run `make gpu-wheels` on a machine with network access, then carry the folder)")
        wheels.append(str(found[-1]))
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--target", str(target), *wheels])
    return missing


def cuda_test_files() -> list[str]:
    """Test files with `cuda`-marked tests (only those are collected: the others may import
    packages this machine lacks, such as vLLM)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def summary(junit: Path) -> tuple[list[tuple[str, str, str, str]], int]:
    """(rows of test, result, seconds, what it measured or why it did not run; number failed)."""
    rows, failed = [], 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        result, note = "passed", props.get("measured", "")
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                result, failed = "FAILED", failed + 1
                message = (el.get("message") or tag).splitlines()[0][:160]
                note = f"{message} | {note}" if note else message
        skipped = case.find("skipped")
        if skipped is not None:
            result, note = "not run", (skipped.get("message") or "").replace("Skipped: ", "")[:160]
        rows.append((name, result, f"{float(case.get('time', 0)):.1f}", note))
    return rows, failed


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows + [("test", "result", "s", "")]) for i in range(3)]
    print(f"{'test':{widths[0]}}  {'result':{widths[1]}}  {'s':>{widths[2]}}  measured / reason")
    for name, result, secs, note in rows:
        print(f"{name:{widths[0]}}  {result:{widths[1]}}  {secs:>{widths[2]}}  {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=str(ROOT / "build" / "gpu-wheels"),
                        help="folder of carried wheels (from --download-wheels)")
    parser.add_argument("--download-wheels", metavar="DIR", help="download the wheels into DIR and exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))

    try:
        import torch
    except ImportError as e:
        print(f"gpu-check: torch does not import with {sys.executable} ({e}); this check runs with the "
              "Python of a GPU machine that has a CUDA build of torch; nothing was run.", file=sys.stderr)
        return EXIT_NO_CUDA
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is "
              "False). This check runs only on a machine with a GPU; nothing was run.", file=sys.stderr)
        return EXIT_NO_CUDA
    build = ROOT / "build" / "gpu-check"
    build.mkdir(parents=True, exist_ok=True)
    site = build / "site"
    installed = install_missing(Path(args.wheels), site)
    if installed:
        print(f"gpu-check: installed from {args.wheels} into {site}: {', '.join(installed)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    junit = build / "junit.xml"
    junit.unlink(missing_ok=True)
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
           f"--junitxml={junit}", "-o", "junit_family=xunit1", *files]
    print("gpu-check:", " ".join(cmd), flush=True)
    start = time.monotonic()
    try:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        print(f"gpu-check: the tests did not finish within {TIME_LIMIT_S // 60} minutes", file=sys.stderr)
        return 1
    if not junit.is_file():
        print(f"gpu-check: pytest exited {rc} without a report", file=sys.stderr)
        return 1
    rows, failed = summary(junit)
    props = torch.cuda.get_device_properties(0)
    print(f"\ngpu-check summary: {props.name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{time.monotonic() - start:.0f} s")
    print_table(rows)
    ran = sum(1 for r in rows if r[1] != "not run")
    print(f"{ran - failed} passed, {failed} failed, {len(rows) - ran} not run")
    return 1 if failed or rc not in (0, 5) or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
