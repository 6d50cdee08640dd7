"""Pieces shared by the op modules."""

from __future__ import annotations

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
