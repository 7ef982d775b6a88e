"""Peak memory of a piece of CPU work, for benchmarks and memory tests: the allocator's own
accounting of tensor bytes, and the resident set's high-water mark."""

from __future__ import annotations

import ctypes
import gc
import os
from typing import Callable

import torch


def rss_bytes(field: str = "VmRSS") -> int:
    """A field of ``/proc/self/status`` in bytes (``VmRSS`` now, ``VmHWM`` the high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def settle() -> int:
    """Free what can be freed, return it to the OS, reset the high-water mark; the RSS now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes("VmRSS")


def _accounting_flag() -> ctypes.c_bool:
    libc10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return ctypes.c_bool.in_dll(libc10, "FLAGS_caffe2_report_cpu_memory_usage")


def count_all_cpu_allocations(on: bool = True) -> None:
    """Make c10's CPU allocator count every allocation and free in the process (gloo's and other
    threads' too), not only those of a thread the profiler watches."""
    _accounting_flag().value = on


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """The allocator's peak running total while ``fn()`` runs minus its total before: the extra
    memory ``fn`` needed at its worst, counting every thread (c10's
    ``caffe2_report_cpu_memory_usage`` accounting, read through torch.profiler's memory events).
    Allocation counting is on during ``fn`` and as before afterwards."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    flag = _accounting_flag()
    was = flag.value
    flag.value = True
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.empty(1)  # the first event carries the total before fn
            fn()
    finally:
        flag.value = was
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append(e)
    events.sort(key=lambda e: e.start_time_ns)
    start = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - start
