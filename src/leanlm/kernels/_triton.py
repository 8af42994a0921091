"""``triton`` and ``triton.language``, or stand-ins where Triton is not installed.

Triton has wheels for Linux only (CUDA builds of torch bring it along), but the core of leanlm —
the model, checkpoints, generation — must import wherever torch does. Every kernel module takes
``triton`` and ``tl`` from here instead of importing Triton itself. With Triton installed they
are the real modules. Without it, ``@triton.jit`` returns a stand-in kernel that raises a clear
error if it is ever launched, ``tl`` is only named inside kernel bodies (which are never
compiled) and in string annotations, and :func:`leanlm.kernels.use_triton` never picks a kernel,
so the torch references run. vLLM's ``triton_utils`` uses the same pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from leanlm.errors import LeanLMError

MISSING = "Triton is not installed (pip install triton; Linux only): the torch reference runs instead"


class _MissingKernel:
    """What ``@triton.jit`` gives without Triton: a kernel that cannot be launched."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.fn = fn

    def __getitem__(self, grid: object) -> Callable[..., Any]:
        raise LeanLMError(f"cannot launch {self.__name__}: {MISSING}")


class _MissingModule:
    """A stand-in for ``triton`` / ``triton.language``: decorators work, anything else raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def jit(self, fn: Callable[..., Any] | None = None, **_: Any) -> Any:
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    def __getattr__(self, attr: str) -> Any:
        raise LeanLMError(f"{self._name}.{attr}: {MISSING}")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no wheel for this platform, or a torch install without it
    triton = _MissingModule("triton")  # type: ignore[assignment]
    tl = _MissingModule("triton.language")  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
