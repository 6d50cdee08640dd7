"""NumPy and CuPy in, the same kind out (docs/method.md §2).

NumPy arrays enter through ``torch.from_numpy`` and CuPy arrays through DLPack, both
zero-copy, so an in-place op on a NumPy or CuPy bank writes the caller's memory. CuPy is
never imported here (an array is recognised by its type's module), and CUDA is never asked
about unless a CuPy array comes in: with CuPy installed on a machine without a GPU, NumPy and
torch inputs run as without it.
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
    """``x`` as a torch tensor, sharing its memory where torch can.

    A NumPy array that torch cannot view (negative strides, strides that are not a multiple of
    the item size, non-native byte order) is copied when it is only read, and refused, naming
    it, when ``writable``: it is the target of an in-place op, which must write the caller's
    memory. ``writable`` also refuses a read-only array (``flags.writeable`` False:
    ``np.load(..., mmap_mode="r")``, ``np.broadcast_to``, ``np.frombuffer(bytes)``): writing
    one through torch would write what NumPy promised not to, or fault on read-only pages."""
    kind = array_kind(x)
    if kind == "numpy":
        return _from_numpy(x, name, writable)
    if kind == "cupy":
        if not torch.cuda.is_available():
            # torch.from_dlpack would fail with "AssertionError: Torch not compiled with CUDA
            # enabled" (a CPU build of torch) or a CUDA error: say it once, naming the argument.
            raise TypeError(
                f"{name} is a CuPy array, and CuPy arrays need CUDA, which torch {torch.__version__} does not "
                "have here (torch.cuda.is_available() is False): pass a NumPy array or a torch tensor"
            )
        return torch.from_dlpack(x)
    return x


def as_tensor(x, name: str, *, device=None) -> torch.Tensor:
    """``x`` (a tensor, a NumPy or CuPy array, or a list of numbers) as a tensor on ``device``;
    ``TypeError`` naming ``name`` for anything else (a string, an object array, ragged lists)."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a tensor, an array or a list of numbers, got {type(x).__name__}")
    t = to_torch(x, name)
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TypeError(f"{name} must be a tensor, an array or a list of numbers ({why})") from None
    return t if device is None else t.to(device)


def _from_numpy(x: np.ndarray, name: str, writable: bool) -> torch.Tensor:
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{name} has NumPy dtype {x.dtype}; expected a float, integer or bool array")
    if writable:
        if not x.flags.writeable:
            # TypeError: read-only is what kind of object this is, not a bad value; Python
            # says the same for other read-only buffers (memoryview, bytes).
            raise TypeError(
                f"{name} is a read-only NumPy array (flags.writeable is False, e.g. np.load(..., "
                f'mmap_mode="r")) and is written in place: pass a writable array (mmap_mode="r+", or a copy)'
            )
        if not x.dtype.isnative:
            raise TypeError(f"{name} has non-native byte order ({x.dtype.str}) and is written in place")
    elif not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if any(s < 0 or s % x.itemsize for s in x.strides):
        if x.flags.c_contiguous:
            x = x.reshape(-1).reshape(x.shape)  # the odd stride is on a dimension of size 1: a view
        elif writable:
            raise ValueError(f"{name} must be contiguous to be updated in place, got strides {x.strides}")
        else:
            x = np.ascontiguousarray(x)  # torch has no negative strides: a copy, the array is only read
    try:
        if x.flags.writeable:
            return torch.from_numpy(x)
        # Only read: torch's warning that writing it would be undefined does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(x)
    except TypeError as e:  # a dtype torch lacks, e.g. longdouble
        raise TypeError(f"{name} has NumPy dtype {x.dtype}, which torch does not support ({e})") from None


def from_torch(t: torch.Tensor, kind: str | None):
    if kind == "numpy":
        return t.detach().cpu().numpy()
    if kind == "cupy":
        import cupy  # present, since a CuPy array came in

        return cupy.from_dlpack(t.detach())
    return t


def _back(t, kind: str):
    if isinstance(t, (tuple, list)):  # a pair, or a list of pairs (propagate with several k)
        return type(t)(_back(r, kind) for r in t)
    return t if t.requires_grad else from_torch(t, kind)


def accepts_arrays(*names: str):
    """Decorator: converts the named arguments from NumPy/CuPy to torch, and converts the
    result back to the kind of the first named argument that was given as an array, where no
    named argument is a torch tensor: a call with any torch tensor returns torch (embeddings kept
    in torch with labels from NumPy got NumPy back, and ``aggregation_loss`` then returned torch
    while its ``v`` required grad and NumPy under ``torch.no_grad``: one call, two types). A
    result that carries a gradient stays a torch tensor whatever came in."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            # (any argument, as given: topk_scores' init, a pair not among the converted names, too)
            any_torch = any(
                isinstance(v, torch.Tensor)
                or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))
                for v in bound.arguments.values()
            )
            out_kind = None
            for name in names:
                if name in bound.arguments and bound.arguments[name] is not None:
                    value = bound.arguments[name]
                    kind = array_kind(value)
                    if out_kind is None and kind in ("numpy", "cupy"):
                        out_kind = kind
                    bound.arguments[name] = to_torch(value, name)
            result = fn(*bound.args, **bound.kwargs)
            return result if out_kind is None or any_torch else _back(result, out_kind)

        return inner

    return wrap
