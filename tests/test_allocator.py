"""glibc malloc thresholds for CPU inference (``leanlm/allocator.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, os, sys
from leanlm.allocator import keep_freed_memory
print(keep_freed_memory())
# a freed 8 MB block stays in the heap: allocating it again touches no new pages
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 8 << 20
a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)
faults = lambda: int(open("/proc/self/stat").read().split(")")[1].split()[7])
before = faults()
b = libc.malloc(n); ctypes.memset(b, 1, n)
print(faults() - before)
"""


def _run(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    applied, faults = _run(env)
    assert applied == "True" and faults < 100  # 8 MB is 2048 pages when they are fresh
    applied, faults = _run({**env, "LEANLM_KEEP_FREED_MEMORY": "0"})
    assert applied == "False" and faults > 1000  # glibc's default: mmap, munmap, fault again
