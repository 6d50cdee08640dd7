"""NumPy and CuPy in, the same kind out (docs/method.md §2).

NumPy arrays enter through ``torch.from_numpy`` and CuPy arrays through DLPack, both
zero-copy, so an in-place op on a NumPy or CuPy bank writes the caller's memory. CuPy is
never imported here: an array is recognised by its type's module.
"""

from __future__ import annotations

import functools
import inspect
import warnings

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


def to_torch(x, name: str, *, writable: bool = False):
    """``x`` as a torch tensor sharing its memory. ``writable``: ``x`` is the target of an
    in-place op, so a read-only NumPy array (``flags.writeable`` False: ``np.load(...,
    mmap_mode="r")``, ``np.broadcast_to``, ``np.frombuffer(bytes)``) is refused. Writing
    one through torch would write what NumPy promised not to, or fault on read-only pages."""
    kind = array_kind(x)
    if kind == "numpy":
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} has NumPy dtype {x.dtype}; expected a float, integer or bool array")
        if not x.flags.writeable:
            if writable:
                # TypeError: read-only is what kind of object this is, not a bad value; Python
                # says the same for other read-only buffers (memoryview, bytes).
                raise TypeError(
                    f"{name} is a read-only NumPy array (flags.writeable is False, e.g. np.load(..., "
                    f'mmap_mode="r")) and is written in place: pass a writable array '
                    f'(mmap_mode="r+", or a copy)'
                )
            # Only read: torch's warning that writing it would be undefined does not apply.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(x)
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
