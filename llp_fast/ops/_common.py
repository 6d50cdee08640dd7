"""Pieces shared by the op modules."""

from __future__ import annotations

import functools
import threading

import torch


def out_float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Float outputs are float32, or float64 when an input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def with_fallback(launcher_name: str, reference):
    """A CUDA body: the Triton launcher ``launcher_name`` when triton is importable and the
    launcher accepts the arguments, else ``reference``. A launcher returns NotImplemented
    for configurations it does not cover (say k above its limit)."""
    from .. import _optional

    def body(*args):
        launcher = _optional.kernel(launcher_name)
        if launcher is not None:
            out = launcher(*args)
            if out is not NotImplemented:
                return out
        return reference(*args)

    return body


_redispatching = threading.local()


def compiled_first(op_name: str):
    """Decorator for an op's default body (the reference, at CompositeExplicitAutograd): the first
    time it runs for a device, the compiled extension is loaded (``_ext.load``: import, or a JIT
    build); if that registered a kernel for ``llp_fast::op_name`` on the device, the call is
    re-dispatched there, and later calls go straight to the kernel without passing here. Otherwise
    (no extension, another device) the reference runs. A thread-local guard makes a re-dispatch
    that lands here again run the reference instead of looping."""
    from .. import _ext

    def wrap(fn):
        @functools.wraps(fn)
        def body(*args):
            if not getattr(_redispatching, "on", False):
                device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
                if device is not None and _ext.has_kernel(op_name, device):
                    _redispatching.on = True
                    try:
                        return getattr(torch.ops.llp_fast, op_name).default(*args)
                    finally:
                        _redispatching.on = False
            return fn(*args)

        return body

    return wrap
