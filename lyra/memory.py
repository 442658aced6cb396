"""Process memory: readings for the benchmark scripts (Linux `/proc`), and the glibc heap
setting that CPU training runs under (`keep_freed_memory`)."""

from __future__ import annotations

import ctypes
import platform

# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve large CPU tensors from the glibc heap and keep freed pages for reuse.

    By default glibc gives every allocation over 32 MiB its own fresh `mmap`, and returns it on
    free, so each training step pays page faults for every large tensor again: with a 152K
    vocabulary, the LM head's logits and the tied embedding's gradients are ~80 MiB each, and the
    faults cost a small model's training step a third of its time (`scripts/bench_malloc.py`). After this
    call the process keeps its peak heap instead of giving it back. The numbers computed do not
    change. Returns False (and changes nothing) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def status_mib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current RSS
