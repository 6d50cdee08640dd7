"""NumPy and CuPy in, the same kind out (SPEC §2).

NumPy arrays enter through ``torch.from_numpy`` and CuPy arrays through DLPack, both
zero-copy, so an in-place op on a NumPy or CuPy bank writes the caller's memory. CuPy is
never imported here: an array is recognised by its type's module.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch


def array_kind(x) -> str | None:
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    if type(x).__module__.split(".")[0] == "cupy":
        return "cupy"
    return None


def to_torch(x, name: str):
    kind = array_kind(x)
    if kind == "numpy":
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} has NumPy dtype {x.dtype}; expected a float, integer or bool array")
        return torch.from_numpy(x)
    if kind == "cupy":
        return torch.from_dlpack(x)
    return x


def from_torch(t: torch.Tensor, kind: str | None):
    if kind == "numpy":
        return t.detach().cpu().numpy()
    if kind == "cupy":
        import cupy  # present, since a CuPy array came in

        return cupy.from_dlpack(t.detach())
    return t


def accepts_arrays(*names: str):
    """Decorator: converts the named arguments from NumPy/CuPy to torch, and converts the
    result back to the kind of the first named argument that was given as an array."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            out_kind = None
            for name in names:
                if name in bound.arguments and bound.arguments[name] is not None:
                    value = bound.arguments[name]
                    kind = array_kind(value)
                    if out_kind is None and kind in ("numpy", "cupy"):
                        out_kind = kind
                    bound.arguments[name] = to_torch(value, name)
            result = fn(*bound.args, **bound.kwargs)
            if out_kind is None:
                return result
            if isinstance(result, tuple):
                return tuple(from_torch(r, out_kind) for r in result)
            return from_torch(result, out_kind)

        return inner

    return wrap
