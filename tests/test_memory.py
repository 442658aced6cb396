"""lyra.memory.keep_freed_memory: large tensors come from the glibc heap, which keeps freed pages."""

import platform
import subprocess
import sys

import pytest

# Run in a fresh interpreter: mallopt changes the whole process, and the "before" half needs
# glibc's defaults. mallinfo2 (glibc >= 2.33) reports heap bytes (arena) and mmap bytes (hblkhd).
PROBE = r"""
import ctypes, sys
import torch
from lyra.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
MIB = 2**20

def big_tensor_sources():
    before = libc.mallinfo2()
    tensor = torch.empty(80 * MIB // 4)  # the size of a nano LM head's logits
    during = libc.mallinfo2()
    del tensor
    after = libc.mallinfo2()
    return (during.hblkhd - before.hblkhd) // MIB, (during.arena - before.arena) // MIB, (after.arena - during.arena) // MIB

mapped, heap, _ = big_tensor_sources()
assert mapped >= 80 and heap < 8, ("glibc default: own mmap", mapped, heap)
assert keep_freed_memory()
mapped, heap, released = big_tensor_sources()
assert mapped == 0 and heap >= 72 and released == 0, ("after keep_freed_memory: heap, kept", mapped, heap, released)
print("ok")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc heap setting")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
