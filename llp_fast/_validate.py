"""Argument checks shared by the public functions (docs/method.md §6).

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, range or value) with a message that names the argument. Checks that read tensor
*values* (finiteness, index ranges) are skipped while ``torch.compile`` traces, where they
would break the graph; shape, dtype and device checks always run.
"""

from __future__ import annotations

import math
import numbers
import weakref

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tracing() -> bool:
    return torch.compiler.is_compiling()


def tensor(x, name: str) -> torch.Tensor:
    """``x`` is a torch tensor. The public ops convert NumPy and CuPy arrays before they get here;
    an array that arrives here was passed where only torch is taken (``MemoryBank``'s methods)."""
    if not isinstance(x, torch.Tensor):
        lib = type(x).__module__.split(".")[0]
        if isinstance(x, np.generic):  # (np.float32(1.0) read "got a numpy array (convert it with torch.from_numpy)")
            raise TypeError(f"{name} must be an array or tensor, got the NumPy scalar {x!r}")
        if lib in ("numpy", "cupy"):
            how = "torch.from_numpy" if lib == "numpy" else "torch.from_dlpack"
            raise TypeError(f"{name} must be a torch.Tensor here, got a {lib} array (convert it with {how})")
        raise TypeError(f"{name} must be a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(x).__name__}")
    if x.layout != torch.strided:  # (torch's own "Could not run 'aten::aminmax' ... 'SparseCPU' backend")
        raise TypeError(f"{name} is a {x.layout} tensor: pass a dense one ({name}.to_dense())")
    return x


def on_a_real_device(x: torch.Tensor, name: str) -> None:
    """Not a ``meta`` tensor: it has no values for an op to read (every op's checks and kernels
    read them; it was torch's ``item()`` error)."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: pass a cpu or cuda tensor")


def embeddings(x, name: str, *, allow_empty: bool = True) -> torch.Tensor:
    """A (rows, D) floating-point matrix."""
    tensor(x, name)
    on_a_real_device(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (D >= 1), got shape {tuple(x.shape)}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one row is needed")
    return x


def writable(x: torch.Tensor, name: str, *, memory: bool = True) -> None:
    """``x`` can be written in place by an op, on every backend, without faulting.

    Refuses (``TypeError``: the kind of tensor, not its values, is wrong):
    - an inference tensor outside ``torch.inference_mode``: torch forbids in-place updates to
      it there, so the reference body raised while the C++ kernel wrote;
    - with ``memory``, a CPU tensor over memory the process may not write (``torch.from_numpy``
      of a read-only memory map): a write is a segmentation fault. Only storages torch did not
      allocate (not resizable: from NumPy, DLPack or a file) are looked up, in
      ``/proc/self/maps`` (one read of a small file), and a tensor found writable is remembered while it lives,
      so a training loop pays once. (A NumPy array's own ``flags.writeable`` already says this:
      the NumPy path passes ``memory=False``.)
    A non-contiguous or expanded (stride 0) tensor is refused by the caller's contiguity check.
    Not seen: ``torch.from_numpy`` of an array made read-only by its flag alone over writable
    memory (torch warned when it made that tensor; nothing faults).
    """
    if tracing():
        return  # neither question can be asked of a traced tensor
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise TypeError(
            f"{name} is an inference tensor (created under torch.inference_mode()) and cannot be "
            "updated in place outside it: clone it outside inference mode, or call inside it"
        )
    if not memory or x.device.type != "cpu" or not x.numel() or x.untyped_storage().resizable():
        return
    start, end = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
    seen = _writable_seen.get(id(x))
    if seen is not None and seen[0]() is x and seen[1:] == (start, end):
        return
    if _read_only_memory(start, end):
        raise TypeError(
            f"{name} lies in read-only memory (e.g. torch.from_numpy of np.load(..., "
            'mmap_mode="r")) and is written in place: pass a writable tensor (a copy)'
        )
    if len(_writable_seen) >= 64:
        for key in [k for k, v in _writable_seen.items() if v[0]() is None]:
            _writable_seen.pop(key, None)
    _writable_seen[id(x)] = (weakref.ref(x), start, end)


# id(tensor) -> (weakref, start, end) of tensors over external memory found writable: while the
# tensor lives, its storage (kept alive by it) stays mapped as it was.
_writable_seen: dict[int, tuple] = {}


def _read_only_memory(start: int, end: int) -> bool:
    """Whether a mapping without write permission overlaps [start, end) (Linux; False
    where ``/proc/self/maps`` cannot be read)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            maps = f.read()
    except OSError:
        return False
    for line in maps.splitlines():
        span, perms = line.split(None, 2)[:2]
        lo, hi = (int(a, 16) for a in span.split(b"-"))
        if lo >= end:
            break  # the lines are sorted by address
        if start < hi and b"w" not in perms:
            return True
    return False


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` overlap (same device; a conservative test on
    the address ranges, strides included)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        lo = hi = t.data_ptr()
        for size, stride in zip(t.shape, t.stride()):
            step = (size - 1) * stride * t.element_size()
            lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
        return lo, hi + t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def finite(x: torch.Tensor, name: str) -> float:
    """Raises if ``x`` holds NaN or Inf; returns its largest magnitude (0 when empty; 1, as for
    unit rows, while tracing, where values cannot be read). One pass, no copy of ``x``."""
    if tracing():
        return 1.0
    if not x.numel():
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN and Inf reach both ends
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    return max(-lo, hi)


def scores_fit(tau: float, a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, size_a, size_b, **bias) -> None:
    """The scores ``a_i . b_j / tau`` (minus a bias, ``log_rho=magnitude``) stay within the
    compute dtype's range (float64 for float64 inputs, else float32), with room for the
    difference of two scores that every op takes: finite inputs give finite results.

    ``size_a``, ``size_b``: the inputs' largest magnitudes (:func:`finite`; 1 for unit rows when
    they were not read). ``|a_i . b_j| <= D * size_a * size_b`` bounds the scores."""
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    limit = torch.finfo(dtype).max / 4
    if not 1.0 / tau <= torch.finfo(dtype).max:  # every path multiplies by 1/tau in that dtype
        raise ValueError(f"tau={tau:.3g}: 1/tau overflows {dtype} (raise tau, or pass float64 inputs)")
    for name, size in bias.items():
        if not size <= limit:
            raise ValueError(f"{name} holds values up to {size:.3g} in magnitude, beyond the {dtype} scores")
    # (with tau > 1 the dot product itself, formed before the 1/tau, overflowed where the score fit)
    bound = a.shape[-1] * size_a * size_b * max(1.0, 1.0 / tau)
    if not bound <= limit:
        what = f"scores {a_name} . {b_name} / tau" if tau <= 1 else f"dot products {a_name} . {b_name} (before / tau)"
        raise ValueError(
            f"{what} may reach {bound:.3g} (D={a.shape[-1]}, |{a_name}| <= {size_a:.3g}, "
            f"|{b_name}| <= {size_b:.3g}, tau={tau:.3g}), beyond {dtype}: scale the embeddings down"
            + (" or raise tau" if tau <= 1 else "")
        )


def blend_fits(bank: torch.Tensor, size: float, name: str) -> None:
    """Values of largest magnitude ``size`` can be cast to the bank's dtype and blended and
    normalized (``|mu m + (1 - mu) v|^2 <= D max(|m|, |v|)^2``, unit bank rows) without overflow."""
    compute = torch.float64 if bank.dtype == torch.float64 else torch.float32
    limit = min(torch.finfo(bank.dtype).max, math.sqrt(torch.finfo(compute).max / bank.shape[1]))
    if not size <= limit:
        raise ValueError(
            f"{name} holds entries up to {size:.3g} in magnitude; a {bank.dtype} bank of D={bank.shape[1]} takes "
            f"at most {limit:.3g} (beyond, the cast or the norm of the blend overflows)"
        )


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
    on_a_real_device(x, name)
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
        want = {
            "int": "an integer dtype (int64, int32, int16, int8 or uint8; cast wider unsigned ones to int64)",
            "float": "a floating dtype",
            "bool": "torch.bool",
        }[kind]
        raise TypeError(f"{name} must have {want}, got {x.dtype}")
    return x


def in_range(x: torch.Tensor, name: str, low: int, high: int, what: str) -> None:
    """All entries in [low, high); in a compiled graph, which cannot raise on a value, a runtime
    assert (a RuntimeError, where a compiled many-class propagate voted for an id beyond the classes)."""
    if x.numel() == 0:
        return
    if tracing():
        torch._assert_async((x.min() >= low) & (x.max() < high), f"{name}: an entry outside [{low}, {high}) ({what})")
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
    if x >= 2**63:  # torch's int64 arguments (it was torch's type error)
        raise ValueError(f"{name} must be below 2**63, got {x}")
    return x


def _as_float(x, name: str) -> float:
    try:
        return float(x)
    except OverflowError:  # an int beyond float's range (10**400)
        raise ValueError(f"{name} is beyond a float's range, got an int of {len(str(abs(x)))} digits") from None


def temperature(tau, name: str = "tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(tau).__name__}")
    tau = _as_float(tau, name)
    # (compares, not math.isfinite: a compiled caller's changing tau is a symbolic float; 1/1e-320 is inf)
    if not (tau > 0 and tau < math.inf and 1.0 / tau < math.inf):
        raise ValueError(f"{name} must be a finite number > 0 with a finite inverse, got {tau}")
    return tau


def unit_interval(x, name: str) -> float:
    """In [0, 1] (the meaning of :func:`llp_fast._checks.unit_interval`)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    x = _as_float(x, name)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {x}")
    return x
