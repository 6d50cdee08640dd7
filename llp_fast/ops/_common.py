"""Pieces shared by the op modules."""

from __future__ import annotations

import functools
import threading

import torch

from .._op_table import OPS


def out_float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Float outputs are float32, or float64 when an input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# (op, device type) -> (implementation, why): what served the most recent call of each op on
# each device, read by ``llp_fast.backends(last=True)``. CPU calls served by the extension go
# straight to its kernel after the first, so the first call's entry stands for them all.
LAST_CALL: dict[tuple[str, str], tuple[str, str]] = {}


def with_fallback(launcher_name: str, reference):
    """A CUDA body: the Triton launcher ``launcher_name`` when the kernels are importable and
    ``<launcher_name>_declines`` finds nothing against the arguments, else ``reference``.
    Which one served, and why the launcher did not (say ``triton declined: k=80 > 64``), is
    recorded in ``LAST_CALL``."""
    from .. import _optional

    op = launcher_name.removesuffix("_triton")

    def body(*args):
        launcher = _optional.kernel(launcher_name)
        if launcher is None:
            why = _optional.kernels_unavailable() or f"llp_fast.kernels has no {launcher_name}"
        else:
            declines = _optional.kernel(f"{launcher_name}_declines")
            why = declines(*args) if declines is not None else None
            if why is None:
                out = launcher(*args)
                if out is not NotImplemented:
                    LAST_CALL[(op, "cuda")] = ("triton", launcher_name)
                    return out
                why = "the launcher returned NotImplemented"
            why = f"triton declined: {why}"
        LAST_CALL[(op, "cuda")] = ("reference", why)
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
            device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
            if not getattr(_redispatching, "on", False):
                if device is not None and _ext.has_kernel(op_name, device):
                    LAST_CALL[(op_name, device)] = ("extension", _ext.describe())
                    _redispatching.on = True
                    try:
                        return getattr(torch.ops.llp_fast, op_name).default(*args)
                    finally:
                        _redispatching.on = False
                if device == "cpu" or (device == "cuda" and "cuda" in OPS[op_name].extension):
                    why = _ext.unavailable() or f"the extension has no {device.upper()} kernel for {op_name}"
                    LAST_CALL[(op_name, device)] = ("reference", why)
            return fn(*args)

        return body

    return wrap


def register_cuda(op, name: str, default) -> None:
    """Registers the CUDA body of custom op ``op`` (``llp_fast::name``) from the op table: its
    Triton launcher, falling back to ``default`` (:func:`with_fallback`), when it has one."""
    launcher = OPS[name].triton
    if launcher is not None:
        op.register_kernel("cuda")(with_fallback(launcher, default))


def via_topk_scores(name: str, device: torch.device) -> None:
    """Records, for an op computed through ``topk_scores`` (the op table's ``via``), that its most
    recent call on ``device`` was served by what served the selection."""
    served = LAST_CALL.get(("topk_scores", device.type))
    if served is not None:
        LAST_CALL[(name, device.type)] = served
