"""``triton`` and ``triton.language``, or stand-ins where Triton is not installed.

Triton has wheels for Linux only (CUDA builds of torch bring it along), but the core of leanlm —
the model, checkpoints, generation — must import wherever torch does. Every kernel module takes
``triton`` and ``tl`` from here instead of importing Triton itself. With Triton installed they
are the real modules. Without it, ``@triton.jit`` returns a stand-in kernel that raises a clear
error if it is ever launched, ``tl`` is only named inside kernel bodies (which are never
compiled) and in string annotations, and :func:`leanlm.kernels.use_triton` never picks a kernel,
so the torch references run. vLLM's ``triton_utils`` uses the same pattern.

With Triton installed it is still imported only when a kernel first launches: importing it costs
~0.2 s and ~70 MB of resident memory, which a CPU process that never launches one (``leanlm
generate`` on CPU) would pay for nothing. Until then ``@triton.jit`` records the function; the
first launch of any kernel of a module imports Triton and replaces that module's recorded
kernels, ``triton`` and ``tl`` by the real ones (kernels call each other by their module's global
names, which Triton resolves when it compiles); ``triton.cdiv`` and the like import it on use.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
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


class _LazyKernel:
    """What ``@triton.jit`` gives before Triton is imported: launching it (``kernel[grid]``)
    imports Triton and compiles the module's kernels."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.fn, self.options = fn, options

    def __getitem__(self, grid: object) -> Callable[..., Any]:
        return _materialize(self.fn.__module__)[self.__name__][grid]


class _LazyModule:
    """``triton`` / ``triton.language`` until first use: ``jit`` records, anything else imports."""

    def __init__(self, name: str) -> None:
        self._name = name

    def jit(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        if fn is None:
            return lambda f: _LazyKernel(f, options)
        return _LazyKernel(fn, options)

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def _materialize(module: str) -> dict[str, Any]:
    """Import Triton; give ``module`` the real ``triton``, ``tl`` and jitted kernels."""
    import triton
    import triton.language as tl

    names = vars(sys.modules[module])
    for name, value in list(names.items()):
        if isinstance(value, _LazyKernel):
            names[name] = triton.jit(value.fn, **value.options)
        elif isinstance(value, _LazyModule):
            names[name] = triton if value._name == "triton" else tl
    return names


HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    triton = _LazyModule("triton")
    tl = _LazyModule("triton.language")
else:  # no wheel for this platform, or a torch install without it
    triton = _MissingModule("triton")  # type: ignore[assignment]
    tl = _MissingModule("triton.language")  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "tl", "triton"]
