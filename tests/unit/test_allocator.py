"""engines.allocator: the glibc heap cap that keeps a fold's RSS near what is live."""

import sys

import pytest

from engines import allocator


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_zero_leaves_the_allocator_alone():
    assert allocator.cap_heap(0) is False


@pytest.mark.skipif(allocator._libc() is None, reason="glibc only")
def test_freed_large_blocks_go_back_to_the_system():
    import subprocess

    # In a fresh process: 64 blocks of 8 MiB under a live block, then freed; without the cap they come
    # from the heap (glibc raised its threshold past them) and stay in RSS, with it they are unmapped.
    script = """
import sys, ctypes
sys.path.insert(0, {root!r})
from engines import allocator
from tests.unit.test_allocator import rss_mib
capped = sys.argv[1] == "cap"
if capped:
    assert allocator.cap_heap(128)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
first = libc.malloc(16 << 20); libc.free(first)  # glibc lifts its mmap threshold to 16 MiB
base = rss_mib()
blocks = [libc.malloc(8 << 20) for _ in range(64)]
for block in blocks:
    libc.memset(block, 1, 8 << 20)
pin = libc.malloc(100 << 10)  # a live block above them: the freed space is not at the heap top
libc.memset(pin, 1, 100 << 10)
for block in blocks:
    libc.free(block)
print(rss_mib() - base)
"""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    kept = {mode: float(subprocess.run([sys.executable, "-c", script.format(root=root), mode], capture_output=True,
                                       text=True, check=True, cwd=root).stdout) for mode in ("plain", "cap")}
    assert kept["plain"] > 256  # without the cap the heap holds on to (most of) 512 MiB
    assert kept["cap"] < 64
