"""Input strategies and the property of the fuzz tests (tests/test_fuzz_*.py).

Each example draws every argument of a call valid, except at most one, ``broken``, drawn in one
of the ways that argument can break the contract. Every argument carries its *logical* value (the
values the op must see). A call whose arguments are all valid must give the brute-force result;
a call with a broken argument must raise ``ValueError`` or ``TypeError`` whose message names it
(and an in-place call must write nothing). All randomness comes from hypothesis draws, so a
failing example replays and shrinks (towards the valid, the small and the contiguous).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import event
from hypothesis import strategies as st

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
TAUS = st.sampled_from([0.07, 0.5, 1.0, 3.0, 1e-3])
BAD_TAUS = st.sampled_from([0.0, -0.07, math.nan, math.inf, -math.inf, 1e-320, "0.07", True, None])
EDGE_TAUS = st.sampled_from([1e-30, 1e-37, 1e-40, 1e-300])  # 1/tau near or beyond float32's range
BAD_COUNTS = st.sampled_from([0, -1, 2.0, True, "3", None])
# Layouts an input that is only read may come in; "reversed" and "byteswapped" are NumPy only.
# Finite magnitudes whose scores (|a.b|/tau) or blend norms may overflow the compute dtype.
HUGE = {
    torch.float32: [1e10, 1e19, 1e30, 3e38],
    torch.bfloat16: [1e10, 1e19, 1e30, 3e38],
    torch.float16: [1e3, 6e4],
    torch.float64: [1e100, 1e150, 1e160, 1e300],
}
READ_LAYOUTS_2D = ("contiguous", "transposed", "sliced", "reversed", "expanded", "byteswapped")
READ_LAYOUTS_1D = ("contiguous", "sliced", "reversed", "expanded", "byteswapped")


def examples(default: int) -> int:
    """Examples per fuzz test: ``default`` (sized so that the fuzz modules take about 30 s here),
    or ``LLP_FAST_FUZZ_EXAMPLES`` to hunt longer."""
    return int(os.environ.get("LLP_FAST_FUZZ_EXAMPLES", default))


@dataclass
class Arg:
    """One drawn argument: ``value`` as passed; ``logical`` the values the op must see (a torch
    tensor in the argument's dtype, or the Python value); ``bad`` whether it breaks the contract;
    ``maybe`` whether it is at the edge of it (huge magnitudes, a tiny tau): the op may refuse
    it, naming it, or must compute the right result."""

    value: object
    logical: object = None
    bad: bool = False
    maybe: bool = False


def broken(data, names) -> str | None:
    """Which argument of ``names`` this example breaks, or None (about half the examples)."""
    return data.draw(st.one_of(st.none(), st.sampled_from(list(names))), label="broken argument")


def generator(data, label: str) -> torch.Generator:
    """A torch generator seeded from the draw."""
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label=f"{label} seed"))


def numpy_dtype(dtype: torch.dtype):
    return None if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def lay_out(t: torch.Tensor, layout: str, container: str):
    """``t`` (already of its final dtype) in ``layout`` and ``container`` (torch or numpy;
    bfloat16 has no NumPy dtype: torch then). Layouts: contiguous; transposed (column-major);
    sliced (every other row of a larger buffer with a column gap); reversed (negative strides);
    expanded (stride 0 over the first row: the logical value becomes that row repeated);
    byteswapped (non-native byte order). Returns (value, logical)."""
    if container == "numpy" and numpy_dtype(t.dtype) is None:
        container = "torch"
    if layout in ("reversed", "byteswapped") and container == "torch":
        layout = "contiguous"
    if layout == "expanded" and t.shape[0] == 0:
        layout = "contiguous"
    logical = t[:1].expand(t.shape).clone() if layout == "expanded" else t.clone()
    if container == "torch":
        if layout == "transposed" and t.dim() == 2:
            return t.T.contiguous().T, logical
        if layout == "sliced":
            buf = torch.zeros((2 * t.shape[0],) + tuple(s + 1 for s in t.shape[1:]), dtype=t.dtype)
            idx = (slice(None, None, 2),) + tuple(slice(0, s) for s in t.shape[1:])
            buf[idx] = t
            return buf[idx], logical
        if layout == "expanded":
            return t[:1].expand(t.shape), logical
        return t.clone(), logical
    a = t.numpy()
    if layout == "transposed" and a.ndim == 2:
        return np.asfortranarray(a), logical
    if layout == "sliced":
        buf = np.zeros((2 * a.shape[0],) + tuple(s + 1 for s in a.shape[1:]), dtype=a.dtype)
        idx = (slice(None, None, 2),) + tuple(slice(0, s) for s in a.shape[1:])
        buf[idx] = a
        return buf[idx], logical
    if layout == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1], logical
    if layout == "expanded":
        return np.broadcast_to(a[:1], a.shape), logical
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder("S")), logical
    return a.copy(), logical


def placed(data, name: str, t: torch.Tensor, layouts, containers=("torch", "numpy")) -> Arg:
    """A valid argument holding ``t``, in a drawn layout from ``layouts`` and container."""
    layout = data.draw(st.sampled_from(layouts), label=f"{name} layout")
    container = data.draw(st.sampled_from(containers), label=f"{name} container")
    value, logical = lay_out(t, layout, container)
    return Arg(value, logical)


def unit_rows(data, rows: int, d: int, *, label: str) -> torch.Tensor:
    """``rows`` random float64 unit vectors of dimension ``d``, scaled by a drawn factor
    (the ops do not require unit rows)."""
    x = torch.randn(rows, d, generator=generator(data, label), dtype=torch.float64)
    x = torch.nn.functional.normalize(x, dim=1)
    return x * data.draw(st.sampled_from([1.0, 0.5, 3.0]), label=f"{label} scale")


def wrong_kind(data, name: str, shape: tuple, *, want: str) -> Arg:
    """An argument of the right shape and the wrong kind: a dtype not of kind ``want`` (float,
    int or bool), a list, a string."""
    pool = {
        "float": [torch.int64, torch.int32, torch.bool],
        "int": [torch.float32, torch.float64, torch.bool],
        "bool": [torch.float32, torch.int64, torch.uint8],
    }[want]
    t = torch.zeros(shape, dtype=data.draw(st.sampled_from(pool), label=f"{name} wrong dtype"))
    how = data.draw(st.sampled_from(["torch", "numpy", "list", "string"]), label=f"{name} wrong kind")
    return Arg({"torch": t, "numpy": t.numpy(), "list": t.tolist(), "string": "x"}[how], bad=True)


def matrix(
    data,
    name: str,
    rows: int,
    d: int,
    dtype: torch.dtype,
    *,
    broken: bool = False,
    layouts=READ_LAYOUTS_2D,
    must_match_dtype: bool = True,
    huge: bool = True,
    containers=("torch", "numpy"),
) -> Arg:
    """A (rows, d) float argument of ``dtype``; ``broken``: NaN/Inf, another D, another dtype
    (when it ``must_match_dtype`` a partner's), wrong rank, no columns, wrong kind, or (``huge``)
    finite magnitudes at the edge of the compute dtype's range (a maybe)."""
    if not broken:
        return placed(data, name, unit_rows(data, rows, d, label=name).to(dtype), layouts, containers)
    forms = ["other_d", "rank1", "rank3", "no_columns", "kind"] + ["other_dtype"] * must_match_dtype
    forms += ["nonfinite"] * (rows > 0) + ["huge"] * (rows > 0 and huge)
    how = data.draw(st.sampled_from(forms), label=f"{name} broken as")
    x = unit_rows(data, rows, d, label=name).to(dtype)
    if how == "huge":  # finite, but the scores or the blend may overflow
        x = unit_rows(data, rows, d, label=name) * data.draw(st.sampled_from(HUGE[dtype]), label=f"{name} huge")
        arg = placed(data, name, x.to(dtype), layouts)
        arg.maybe = True
        return arg
    if how == "nonfinite":
        x[data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, d - 1))] = data.draw(
            st.sampled_from([math.nan, math.inf, -math.inf]), label=f"{name} nonfinite"
        )
        arg = placed(data, name, x, layouts)
        arg.bad = not bool(torch.isfinite(arg.logical).all())  # an expanded layout keeps row 0 only
        return arg
    if how == "other_d":
        extra = unit_rows(data, rows, 1, label=name).to(dtype)
        return _bad(placed(data, name, torch.cat([x, extra], 1), layouts))
    if how == "other_dtype":
        other = data.draw(st.sampled_from([f for f in FLOATS if f != dtype]), label=f"{name} other dtype")
        return _bad(placed(data, name, x.to(other), layouts))
    if how == "rank1":
        return Arg(x.reshape(-1), bad=True)
    if how == "rank3":
        return Arg(x[None], bad=True)
    if how == "no_columns":
        return _bad(placed(data, name, x[:, :0], ("contiguous",)))
    return wrong_kind(data, name, (rows, d), want="float")


def ints(data, name: str, values: torch.Tensor, *, broken: bool = False, low=None, high=None) -> Arg:
    """A 1-D integer argument holding ``values`` (int64) in a drawn integer dtype that holds
    them, layout and container; ``broken``: wrong length, wrong rank, wrong kind, or (given the
    valid range [low, high)) a value outside it."""
    n = values.shape[0]
    if broken:
        forms = ["long", "rank2", "kind"] + ["short"] * (n > 0) + ["out_of_range"] * (n > 0 and low is not None)
        how = data.draw(st.sampled_from(forms), label=f"{name} broken as")
        if how == "out_of_range":
            values = values.clone()
            at = data.draw(st.integers(0, n - 1), label=f"{name} at")
            values[at] = data.draw(st.sampled_from([low - 1, high, high + 5, -(2**40), 2**40]), label=name)
            return _bad(ints(data, name, values))
        if how == "short":
            return Arg(values[:-1].clone(), bad=True)
        if how == "long":
            return Arg(torch.cat([values, torch.zeros(1, dtype=values.dtype)]), bad=True)
        if how == "rank2":
            return Arg(values[None].clone(), bad=True)
        return wrong_kind(data, name, (n,), want="int")
    dtype = data.draw(st.sampled_from([d for d in INTS if _holds(d, values)]), label=f"{name} dtype")
    layouts = READ_LAYOUTS_1D if n and bool((values == values[0]).all()) else READ_LAYOUTS_1D[:3] + ("byteswapped",)
    arg = placed(data, name, values.to(dtype), layouts)
    arg.logical = arg.logical.long()
    return arg


def _holds(dtype: torch.dtype, values: torch.Tensor) -> bool:
    if values.numel() == 0:
        return True
    info = torch.iinfo(dtype)
    return info.min <= int(values.min()) and int(values.max()) <= info.max


def _bad(arg: Arg) -> Arg:
    arg.bad = True
    return arg


def scalar(data, name: str, good, bad, *, broken: bool = False, edge=None) -> Arg:
    """A scalar argument from ``good``, or from ``bad`` (or ``edge``, a maybe) when ``broken``."""
    if broken and edge is not None and data.draw(st.booleans(), label=f"{name} at the edge"):
        v = data.draw(edge, label=name)
        return Arg(v, v, maybe=True)
    if broken:
        return Arg(data.draw(bad, label=name), bad=True)
    v = data.draw(good, label=name)
    return Arg(v, v)


def names_one_of(message: str, names) -> bool:
    """Whether ``message`` names one of ``names`` as a whole word (``labeled`` is not found
    inside ``labeled_classes``)."""
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def outcome(call, args: dict):
    """Runs ``call()``. With a broken argument among ``args`` (name -> Arg) it must raise
    ValueError/TypeError naming one; with one at the edge, it may; otherwise it must return.
    Returns the result, or None after an accepted error. Any other exception propagates (a
    failure)."""
    bad = sorted(n for n, a in args.items() if a.bad)
    maybe = sorted(n for n, a in args.items() if a.maybe)
    try:
        out = call()
    except (ValueError, TypeError) as e:
        event("refused: " + ("broken" if bad else "edge" if maybe else "valid"))
        assert bad or maybe, f"valid arguments refused: {type(e).__name__}: {e}"
        named = bad + maybe
        assert names_one_of(str(e), named), f"{type(e).__name__}: {e!s} names none of {named}"
        return None
    event("computed: " + ("broken" if bad else "edge" if maybe else "valid"))
    assert not bad, f"accepted invalid {bad}"
    return out


def f64(x) -> torch.Tensor:
    """A torch tensor or NumPy array as float64 torch (the values of an output)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="), copy=True))
    return x.detach().to(torch.float64)


def propagate_oracle(q, lab, classes, log_rho, k, tau, labels, conf, *, eps):
    """Checks (labels, conf) of propagate against float64 scores, within the rounding of the
    compute dtype (``eps``: its machine epsilon). A score of magnitude S is off by about
    (D + 2) * eps * S: where the K-th and (K+1)-th scores are that close, either neighbour set is
    right; the confidence is off by a few times that, and any class whose weight is within it of
    the best may win. Where the rounding swamps the weights altogether (huge scores), only the
    bounds are checked."""
    q, lab = q.double(), lab.double()
    bias = torch.zeros(lab.shape[0], dtype=torch.float64) if log_rho is None else log_rho.double()
    scores = q @ lab.T / tau - bias
    classes = classes.long()
    for i in range(q.shape[0]):
        s = scores[i]
        err = 4 * (q.shape[1] + 2) * eps * (1.0 + float(s.abs().max()))
        order = torch.argsort(s, descending=True, stable=True)
        nxt = s[order[k]] if k < s.shape[0] else -math.inf
        if float(s[order[k - 1]] - nxt) <= 2 * err or err > 0.1:
            assert 0 < float(conf[i]) <= 1 + 1e-6 and int(labels[i]) in classes.tolist()
            continue
        top = order[:k]
        votes = classes[top]  # weights per class present (num_classes may be 2**40)
        present = torch.unique(votes)
        e = torch.exp(s[top] - s[top].max())
        p = torch.stack([e[votes == c].sum() for c in present])
        p = p / p.sum()
        best, tol = float(p.max()), 1e-6 + 4 * err
        assert abs(float(conf[i]) - best) <= tol, (i, float(conf[i]), best, tol)
        near = present[p >= best - tol].tolist()
        assert int(labels[i]) in near, (i, int(labels[i]), near, p.tolist())


def local_density64(labeled, bank, t, tau, pool=None):
    """log_rho in float64 with a stable log-sum-exp (tests/brute.py exponentiates directly,
    which overflows at tau = 1e-3 or for large magnitudes)."""
    labeled, bank = labeled.double(), bank.double()
    if pool is not None:
        bank = bank[pool.bool()]
    sims = labeled @ bank.T / tau
    return torch.logsumexp(sims.topk(t, dim=1).values, dim=1)


def aggregation_loss64(v, bank, bank_labels, targets, tau):
    """The aggregation loss in float64 from the dense logits, stable."""
    logits = v.double() @ bank.double().T / tau
    same = bank_labels.long()[None, :] == targets.long()[:, None]
    pos = torch.logsumexp(logits.masked_fill(~same, -math.inf), dim=1)
    return torch.logsumexp(logits, dim=1) - pos
