"""Run a function on N gloo ranks in spawned processes, for tests and benchmarks (no torchrun needed)."""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_opd import parallel
from megatron_opd.utils import free_port


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message carries every rank's traceback."""


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict,
            results: Any, env: dict[str, str], num_threads: int) -> None:
    os.environ.update(env)
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
    })
    try:
        torch.set_num_threads(num_threads)
        parallel.init_distributed()
        try:
            out = fn(*args, **kwargs)
        finally:
            parallel.shutdown_distributed()
        # Plain pickle: torch.multiprocessing would pass tensors through shared memory that
        # disappears when this process exits.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0,
                    env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks with torch.distributed initialised.

    ``fn`` must be importable (a module-level function). Returns the per-rank return values
    (which must be picklable), in rank order. If any rank raises, dies or the whole run exceeds
    ``timeout`` seconds, every rank is killed and :class:`DistributedTestError` names the failing
    ranks with their tracebacks.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    num_threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        # Not daemonic: ranks may start processes of their own (dist-checkpoint writers do).
        ctx.Process(target=_worker, daemon=False,
                    args=(rank, world_size, port, fn, args, kwargs, results, env or {}, num_threads))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - outputs.keys() - errors.keys())
                why = ("did not finish (killed after another rank failed)" if errors
                       else f"timed out after {timeout:.0f}s")
                errors.update({r: why for r in missing})
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in outputs and r not in errors]
                # A rank that died without reporting (segfault, os._exit) cannot be waited for.
                if dead:
                    time.sleep(0.5)
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        if status == "ok":
                            outputs[rank] = pickle.loads(payload)
                        else:
                            errors[rank] = payload
                    for r in dead:
                        if r not in outputs and r not in errors:
                            errors[r] = f"process died with exit code {procs[r].exitcode}"
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # Give the other ranks a moment to report their own (often secondary) errors.
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=0.1 if errors else 10.0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [outputs[r] for r in range(world_size)]
