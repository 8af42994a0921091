"""CPU memory of the process: keep freed memory, so inference steps do not page-fault; bound
oneDNN's per-shape caches; and how much memory the machine has available.

glibc's malloc serves a large block (above ``M_MMAP_THRESHOLD``, 128 KiB at first and raised
dynamically) with a fresh ``mmap`` and gives it back to the kernel on ``free``, and trims the heap
top above ``M_TRIM_THRESHOLD``. A serving step allocates megabyte-sized temporaries in every
layer (the K/V gathered for attention, their fp32 copies, activations) and frees them before the
next; when glibc hands those blocks back, every step pays first-touch page faults on all of them
again. Whether it does depends on the allocation history (the dynamic threshold), so the cost
came and went between runs: on 2 EPYC cores, copying K/V into a fresh 5 MB buffer took ~1 ms
instead of ~50 µs, and the engine served 32 concurrent requests at 350–2,400 tokens/s
depending on the run; with the settings below, 2,500–3,000.

:func:`keep_freed_memory` sets both thresholds to 1 GiB (``mallopt``), the remedy that
jemalloc/tcmalloc preloading gives Intel's extension and vLLM's CPU backend, without a preload.
The cost is that the process keeps memory it has freed (up to its peak) instead of returning it.
It is applied once per process by the commands that serve or generate (``leanlm serve``,
``leanlm generate``; the benchmarks likewise), never by a library constructor, and exported as
glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, which glibc reads when a process
starts: the engine cores and workers ``leanlm serve`` spawns get the same setting (``mallopt``
is not inherited). It does nothing where libc is not glibc, or where the user set
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` (their choice stands),
or ``LEANLM_KEEP_FREED_MEMORY=0``.

:func:`bound_kernel_caches` caps the two caches oneDNN keeps per operation shape: its primitive
cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's (``LRU_CACHE_CAPACITY``, torch's oneDNN
wrapper), 1,024 entries each by default. A CPU linear (prepacked or ``F.linear`` in bf16) is one
oneDNN primitive per (rows, weight shape), and a serving step's rows are its number of tokens,
which changes from step to step: each new count adds an entry per weight shape to both caches,
0.2–1.2 MiB each (JIT-compiled kernels and scratchpads grow with the rows). Under steady load the
server's RSS grew by ~30–45 MB per 300 requests and had not levelled off after 1,800 (687 to 1,322
MiB on the default model; disabling both caches held it flat). Replaying a serving mix of row
counts (half 1–2,048, half 1–48) through the default model's four linear shapes: the default
capacity had added 1.2 GiB after 3,000 steps and was still growing; 256 entries each levels off
at +370 MiB within 1,000 steps, 128 at +210. A miss costs a kernel JIT of about half a millisecond;
decode steps reuse a few row counts, which stay cached. The capacities are read when oneDNN first
creates a primitive in the process, so this runs before the first inference (``leanlm serve``
calls it, before the model loads; its engine and worker processes inherit the variables); a
capacity the user set in the environment stands.

:func:`use_huge_pages` backs torch's large CPU tensors with transparent huge pages (``leanlm
serve``: faster decode, slower load).

:func:`drop_pages` hands the pages of a file mapping back to the kernel (``madvise(MADV_DONTNEED)``):
the loader calls it on each weight it has repacked into memory of its own, so the file's pages
it read stop counting against the process.

:func:`available_memory` is Linux's MemAvailable: what the trainer's memory check and the
prepacked linears (``kernels/cpu_linear.py``) may still use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30
MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); whether they were set."""
    user = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    if os.environ.get("LEANLM_KEEP_FREED_MEMORY", "1") == "0" or any(v in os.environ for v in user):
        return False
    try:
        mallopt = _libc().mallopt  # type: ignore[union-attr]
    except AttributeError:  # no libc, or not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    if done:  # processes started from now on (the engine cores and workers): glibc reads these
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(THRESHOLD)
    return done


def drop_pages(start: int, end: int) -> bool:
    """``madvise(MADV_DONTNEED)`` the whole pages within [start, end) of a *file* mapping (on
    anonymous memory this would zero it: callers pass only ranges of a mapping they made);
    whether it was done (not where there is no libc ``madvise``)."""
    libc = _libc()
    lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if libc is None or not hasattr(libc, "madvise") or hi <= lo:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0


def use_huge_pages() -> bool:
    """Back torch's CPU tensors of 2 MiB and more with transparent huge pages: c10's allocator
    aligns them to 2 MiB and ``madvise(MADV_HUGEPAGE)``s them when ``THP_MEM_ALLOC_ENABLE=1``,
    which it reads at its first such allocation (so this runs before the model loads; exported,
    so spawned processes get it too). A decode step streams every weight once, and with 4 KiB
    pages it pays a TLB miss per page and the hardware prefetchers stop at every page boundary:
    on 2 EPYC cores the 1B model decoded at 120 ms/token on 4 KiB pages and 107 on huge pages
    (medians of 4 processes each, alternating). The price is paid at load: faulting in 2 MiB
    pages (zeroed, compacted for) made a whole ``leanlm generate`` of 96 tokens 15.4 → 17.7 s.
    So ``leanlm serve`` (long-lived) calls this and ``leanlm generate`` does not. Where the
    kernel's THP mode is ``never`` this changes nothing. A value the user set stands; whether it
    is on."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


ONEDNN_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
SHAPE_CACHE_CAPACITY = 256


def bound_kernel_caches(capacity: int = SHAPE_CACHE_CAPACITY) -> list[str]:
    """Cap oneDNN's per-shape caches at ``capacity`` entries each (where the environment does not
    set them); the variables set. Effective only before the process's first oneDNN primitive."""
    unset = [name for name in ONEDNN_CACHES if name not in os.environ]
    for name in unset:
        os.environ[name] = str(capacity)
    return unset


def available_memory() -> float:
    """MemAvailable of /proc/meminfo in bytes (inf where there is none). It counts reclaimable
    page cache, unlike the free-pages count."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")
