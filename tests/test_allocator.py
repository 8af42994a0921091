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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_processes_started_afterwards_keep_freed_memory_too() -> None:
    """``leanlm serve``'s engine cores and workers are spawned processes: mallopt is not
    inherited, the environment variables glibc reads at start are."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    child = PROBE.replace("from leanlm.allocator import keep_freed_memory\nprint(keep_freed_memory())",
                          "print('child')")
    parent = ("import subprocess, sys\nfrom leanlm.allocator import keep_freed_memory\nkeep_freed_memory()\n"
              f"sys.stdout.write(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, "
              "text=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[0] == "child" and int(out.stdout.split()[1]) < 100


CACHES = """
import os, sys, psutil, torch
from leanlm.allocator import bound_kernel_caches
print(",".join(bound_kernel_caches(16)))
w = torch.randn(864, 320, dtype=torch.bfloat16)
packed = torch.ops.mkldnn._reorder_linear_weight(w)
rss = psutil.Process().memory_info().rss
with torch.inference_mode():
    for m in range(1, 301):  # a new number of rows each call, as serving steps have
        x = torch.randn(m, 320, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
print((psutil.Process().memory_info().rss - rss) / 2**20)
"""


@pytest.mark.skipif(not __import__("torch").backends.mkldnn.is_available(), reason="needs oneDNN")
def test_bounded_kernel_caches_keep_rss_from_growing_with_new_shapes() -> None:
    """Each new row count leaves an entry in oneDNN's primitive cache and in ideep's, 1,024 each
    by default: RSS grows with every new shape until then. Capped (here at 16), it does not; a
    capacity the user set stands."""
    caches = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    base = {k: v for k, v in os.environ.items() if k not in caches}

    def growth(env: dict[str, str]) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", CACHES], capture_output=True, text=True, check=True,
                             env=env)
        names, mib = out.stdout.split("\n")[:2]
        return names, float(mib)

    names, capped = growth(base)
    assert names == "ONEDNN_PRIMITIVE_CACHE_CAPACITY,LRU_CACHE_CAPACITY"
    names, default = growth({**base, **dict.fromkeys(caches, "1024")})
    assert names == ""  # the user's settings stand
    assert capped < default / 3, (capped, default)


def test_huge_pages_are_asked_for_unless_the_user_chose(monkeypatch):
    from leanlm.allocator import use_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert use_huge_pages() and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert not use_huge_pages() and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
