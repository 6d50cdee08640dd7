"""Argument checks shared by the public functions (SPEC §6).

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, range or value) with a message that names the argument. Checks that read tensor
*values* (finiteness, index ranges) are skipped while ``torch.compile`` traces, where they
would break the graph; shape, dtype and device checks always run.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tracing() -> bool:
    return torch.compiler.is_compiling()


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(x).__name__}")
    return x


def embeddings(x, name: str, *, allow_empty: bool = True) -> torch.Tensor:
    """A (rows, D) floating-point matrix."""
    tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (D >= 1), got shape {tuple(x.shape)}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one row is needed")
    return x


def finite(x: torch.Tensor, name: str) -> None:
    if not tracing() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def same_space(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, *, dtype: bool = True) -> None:
    """``b`` lives where ``a`` does: same D, device and (optionally) dtype."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{b_name} has D={b.shape[-1]} but {a_name} has D={a.shape[-1]}")
    if a.device != b.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{b_name} is {b.dtype} but {a_name} is {a.dtype}; cast one so they match")


def vector(x, name: str, length: int, *, device: torch.device, kind: str) -> torch.Tensor:
    """A 1-D tensor of ``length`` entries on ``device``; ``kind`` is 'int', 'float' or 'bool'."""
    tensor(x, name)
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    ok = {
        "int": x.dtype in INT_DTYPES,
        "float": x.dtype in FLOAT_DTYPES,
        "bool": x.dtype == torch.bool,
    }[kind]
    if not ok:
        want = {"int": "an integer dtype", "float": "a floating dtype", "bool": "torch.bool"}[kind]
        raise TypeError(f"{name} must have {want}, got {x.dtype}")
    return x


def in_range(x: torch.Tensor, name: str, low: int, high: int, what: str) -> None:
    """All entries in [low, high)."""
    if tracing() or x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name} holds {bad}, outside [{low}, {high}) ({what})")


def positive_int(x, name: str, *, low: int = 1, high: int | None = None, high_what: str = "") -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"{name}={x} exceeds {high_what} ({high})")
    return x


def temperature(tau, name: str = "tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"{name} must be a finite number > 0, got {tau}")
    return tau


def fraction(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {x}")
    return x
