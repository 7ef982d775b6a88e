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


def _set_cpu_allocation_accounting(on: bool) -> None:
    libc10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(libc10, "FLAGS_caffe2_report_cpu_memory_usage").value = on


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The CPU allocator's peak running total of allocated bytes during ``fn()`` minus its total
    before (c10's ``caffe2_report_cpu_memory_usage`` accounting, read through torch.profiler
    memory events; it also sees frees on other threads, e.g. gloo's)."""
    from torch._C._profiler import _EventType

    _set_cpu_allocation_accounting(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            torch.empty(1)  # the first event carries the total before fn
            fn()
    finally:
        _set_cpu_allocation_accounting(False)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append(e)
    events.sort(key=lambda e: e.start_time_ns)
    start = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - start
