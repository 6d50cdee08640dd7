"""Property-based fuzzing of the public ops (docs/method.md §2, §6).

Random shapes (0 and 1 rows, D = 1), dtypes (float32/64/16, bfloat16, integer, bool), layouts
(transposed, sliced, reversed, expanded, byte-swapped), NaN/Inf, out-of-range ids and indices, k
and t at and beyond their limits, bad temperatures, NumPy and torch inputs. The property: with
every argument valid, the result equals a float64 brute force (tests/brute.py; tie-aware for the
top-K); with one argument broken, ``ValueError``/``TypeError`` naming it, and nothing written.

Runs in a child pytest (the ``isolated`` marker): the fuzzer drives the C++ extension at shapes
and layouts no other test uses, and a native crash must fail these tests, not end the run.
"""

from __future__ import annotations

import math

import brute
import numpy as np
import pytest
import torch
from fuzzing import (
    BAD_COUNTS,
    BAD_TAUS,
    EDGE_TAUS,
    FLOATS,
    TAUS,
    Arg,
    aggregation_loss64,
    broken,
    examples,
    f64,
    generator,
    ints,
    lay_out,
    local_density64,
    matrix,
    outcome,
    placed,
    propagate_oracle,
    scalar,
    unit_rows,
    wrong_kind,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import llp_fast

pytestmark = pytest.mark.isolated

EXAMPLES = examples(300)
SIZES = st.sampled_from([1, 2, 3, 5])  # rows of an input that must not be empty
ANY_SIZE = st.sampled_from([0, 1, 2, 5])
DIMS = st.sampled_from([1, 2, 3, 8])


def _numpy_in(args: dict, names) -> bool:
    return any(isinstance(args[n].value, np.ndarray) for n in names)


def _float_out(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_of(x) -> torch.dtype:
    return x.dtype if isinstance(x, torch.Tensor) else torch.from_numpy(np.empty(0, x.dtype)).dtype


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_propagate(data):
    names = ("queries", "labeled", "labeled_classes", "log_rho", "k", "tau", "num_classes")
    bad = broken(data, names)
    q_rows, d = data.draw(ANY_SIZE, label="Q"), data.draw(DIMS, label="D")
    m = 0 if bad == "labeled" and data.draw(st.booleans(), label="empty labeled") else data.draw(SIZES, label="M")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    n_cls = data.draw(st.sampled_from([1, 2, 3, 2**40]), label="num_classes")
    classes = torch.randint(0, min(n_cls, 4), (m,), generator=generator(data, "classes"))
    args = {
        "queries": matrix(data, "queries", q_rows, d, dtype, broken=bad == "queries"),
        "labeled": matrix(data, "labeled", m, d, dtype, broken=bad == "labeled" and m > 0),
        "labeled_classes": ints(data, "labeled_classes", classes, broken=bad == "labeled_classes", low=0, high=n_cls),
        "log_rho": _log_rho(data, m, broken=bad == "log_rho"),
        "k": scalar(data, "k", st.integers(1, m) if m else st.just(1), BAD_COUNTS | st.just(m + 1), broken=bad == "k"),
        "tau": scalar(data, "tau", TAUS, BAD_TAUS, broken=bad == "tau", edge=EDGE_TAUS),
        "num_classes": scalar(data, "num_classes", st.just(n_cls), BAD_COUNTS, broken=bad == "num_classes"),
    }
    args["labeled"].bad |= m == 0
    kwargs = {n: a.value for n, a in args.items()}
    got = outcome(lambda: llp_fast.propagate(**kwargs), args)
    if got is None:
        return
    labels, conf = got
    kind = np.ndarray if _numpy_in(args, ("queries", "labeled", "labeled_classes", "log_rho")) else torch.Tensor
    assert isinstance(labels, kind) and isinstance(conf, kind)
    assert labels.shape == (q_rows,) and conf.shape == (q_rows,)
    assert _dtype_of(labels) == torch.int64 and _dtype_of(conf) == _float_out(dtype)
    assert not (isinstance(conf, torch.Tensor) and conf.requires_grad)
    log_rho = args["log_rho"].logical
    propagate_oracle(
        args["queries"].logical,
        args["labeled"].logical,
        args["labeled_classes"].logical,
        log_rho,
        args["k"].value,
        args["tau"].value,
        f64(labels).long(),
        f64(conf),
        eps=torch.finfo(_float_out(dtype)).eps,
    )


def _log_rho(data, m: int, *, broken: bool) -> Arg:
    """None, or (M,) densities of a drawn float dtype (sometimes requiring grad); broken: NaN/Inf,
    wrong length, wrong rank, wrong kind."""
    values = torch.randn(m, dtype=torch.float64, generator=generator(data, "log_rho")) * 2
    if broken:
        how = data.draw(st.sampled_from(["long", "rank2", "kind"] + ["nonfinite"] * (m > 0)), label="log_rho broken as")
        if how == "long":
            return Arg(torch.zeros(m + 1), bad=True)
        if how == "rank2":
            return Arg(values[:, None].float(), bad=True)
        if how == "kind":
            return wrong_kind(data, "log_rho", (m,), want="float")
        values[data.draw(st.integers(0, m - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        arg = placed(data, "log_rho", values.float(), ("contiguous", "sliced", "reversed"))
        arg.bad = True
        return arg
    how = data.draw(st.sampled_from(["none", "array", "grad"]), label="log_rho as")
    if how == "none":
        return Arg(None, None)
    t = values.to(data.draw(st.sampled_from(FLOATS), label="log_rho dtype"))
    if how == "grad":
        return Arg(t.clone().requires_grad_(), t)
    return placed(data, "log_rho", t, ("contiguous", "sliced", "reversed", "byteswapped"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_local_density(data):
    bad = broken(data, ("labeled", "bank", "t", "tau", "pool_mask"))
    d, dtype = data.draw(DIMS, label="D"), data.draw(st.sampled_from(FLOATS), label="dtype")
    m = 0 if bad == "labeled" and data.draw(st.booleans(), label="empty labeled") else data.draw(SIZES, label="M")
    n = 0 if bad == "bank" and data.draw(st.booleans(), label="empty bank") else data.draw(SIZES, label="N")
    args = {
        "labeled": matrix(data, "labeled", m, d, dtype, broken=bad == "labeled" and m > 0),
        "bank": matrix(data, "bank", n, d, dtype, broken=bad == "bank" and n > 0),
    }
    args["labeled"].bad |= m == 0
    args["bank"].bad |= n == 0
    pool = n
    if bad == "pool_mask":
        how = data.draw(st.sampled_from(["empty", "long", "kind"]), label="pool_mask broken as")
        if how == "empty":
            args["pool_mask"] = _bad_arg(placed(data, "pool_mask", torch.zeros(n, dtype=torch.bool), ("contiguous",)))
        elif how == "long":
            args["pool_mask"] = Arg(torch.ones(n + 1, dtype=torch.bool), bad=True)
        else:
            args["pool_mask"] = wrong_kind(data, "pool_mask", (n,), want="bool")
    elif data.draw(st.booleans(), label="pool_mask given"):
        mask = torch.rand(n, generator=generator(data, "pool_mask")) < 0.6
        if n:
            mask[data.draw(st.integers(0, n - 1))] = True  # the pool is never empty
        args["pool_mask"] = placed(data, "pool_mask", mask, ("contiguous", "sliced", "reversed"))
        pool = int(args["pool_mask"].logical.sum())
    else:
        args["pool_mask"] = Arg(None)
    good_t = st.integers(1, pool) if pool else st.just(1)
    args["t"] = scalar(data, "t", good_t, BAD_COUNTS | st.just(pool + 1), broken=bad == "t")
    args["tau"] = scalar(data, "tau", TAUS, BAD_TAUS, broken=bad == "tau", edge=EDGE_TAUS)
    kwargs = {k: a.value for k, a in args.items()}
    got = outcome(lambda: llp_fast.local_density(**kwargs), args)
    if got is None:
        return
    assert isinstance(got, np.ndarray if _numpy_in(args, ("labeled", "bank", "pool_mask")) else torch.Tensor)
    assert got.shape == (m,) and _dtype_of(got) == _float_out(dtype)
    mask = args["pool_mask"].logical
    want = local_density64(args["labeled"].logical, args["bank"].logical, args["t"].value, args["tau"].value, mask)
    np.testing.assert_allclose(f64(got).numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


def _bad_arg(arg: Arg) -> Arg:
    arg.bad = True
    return arg


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_aggregation_loss(data):
    bad = broken(data, ("v", "bank", "bank_labels", "targets", "tau"))
    b, d = data.draw(ANY_SIZE, label="B"), data.draw(DIMS, label="D")
    n = 0 if bad == "bank" and data.draw(st.booleans(), label="empty bank") else data.draw(SIZES, label="N")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    g = generator(data, "labels")
    bank_labels = torch.randint(-n - 1, 3, (n,), generator=g)
    targets = torch.randint(-2, 3, (b,), generator=g)
    if n and b:  # mostly targets some row holds; the others give an infinite loss
        held = bank_labels[torch.randint(0, n, (b,), generator=g)]
        targets = torch.where(torch.rand(b, generator=g) < 0.7, held, targets)
    args = {
        "v": matrix(data, "v", b, d, dtype, broken=bad == "v"),
        "bank": matrix(data, "bank", n, d, dtype, broken=bad == "bank" and n > 0),
        "bank_labels": ints(data, "bank_labels", bank_labels, broken=bad == "bank_labels"),
        "targets": ints(data, "targets", targets, broken=bad == "targets"),
        "tau": scalar(data, "tau", TAUS, BAD_TAUS, broken=bad == "tau", edge=EDGE_TAUS),
    }
    args["bank"].bad |= n == 0
    v = args["v"].value
    grad = isinstance(v, torch.Tensor) and v.dtype in FLOATS and data.draw(st.booleans(), label="grad")
    if grad:
        args["v"].value = v.detach().clone().requires_grad_()
    kwargs = {k: a.value for k, a in args.items()}
    got = outcome(lambda: llp_fast.aggregation_loss(**kwargs), args)
    if got is None:
        return
    # NumPy in, NumPy out, except a loss with a gradient (a torch v that requires grad).
    assert isinstance(got, np.ndarray if _numpy_in(args, args) and not grad else torch.Tensor)
    assert got.shape == (b,) and _dtype_of(got) == _float_out(dtype)
    v, bank = args["v"].logical, args["bank"].logical
    lab, tgt, tau = args["bank_labels"].logical, args["targets"].logical, args["tau"].value
    want = aggregation_loss64(v, bank, lab, tgt, tau).numpy()
    # A score of magnitude S is off by about (D + 2) * eps * S in the compute dtype.
    eps = torch.finfo(_float_out(dtype)).eps
    err = 4 * (d + 2) * eps * (1 + float((v.double() @ bank.double().T).abs().max() / tau if b else 0))
    np.testing.assert_allclose(f64(got).numpy(), want, rtol=1e-5, atol=err)
    if grad and b and np.isfinite(want).all() and not any(a.maybe for a in args.values()):
        # dv = (1/tau) sum_j (p_j - q_j) m_j: the probabilities are off by about err each.
        got.sum().backward()
        want_grad = brute.aggregation_grad(v, bank, lab, tgt, tau)
        atol = 2 * err * float(bank.double().norm(dim=1).max()) * n / tau
        rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2  # the gradient is v's dtype
        np.testing.assert_allclose(f64(args["v"].value.grad).numpy(), want_grad, rtol=rtol, atol=atol + 1e-6)


BANK_TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_bank_update(data):
    bad = broken(data, ("bank", "indices", "values", "momentum"))
    n = 0 if bad == "bank" and data.draw(st.booleans(), label="empty bank") else data.draw(SIZES, label="N")
    bsz, d = data.draw(st.sampled_from([0, 1, 2, 4, 7]), label="B"), data.draw(DIMS, label="D")
    bank_dtype = data.draw(st.sampled_from(FLOATS), label="bank dtype")
    values_dtype = data.draw(st.sampled_from(FLOATS), label="values dtype")
    bank = _bank(data, n, d, bank_dtype, broken=bad == "bank" and n > 0)
    bank.bad |= n == 0
    values = matrix(data, "values", bsz, d, values_dtype, broken=bad == "values", must_match_dtype=False)
    idx = torch.randint(0, max(n, 1), (bsz,), generator=generator(data, "indices"))
    unwritable = not _writable_contiguous(bank.value)  # whatever else the draw did to it
    if bank.logical is not None and bank.logical.dim() == 2 and not bool(torch.isfinite(bank.logical).all()):
        # NaN/Inf in the bank: refused when in a row the call blends (only those are read).
        touched = bsz > 0 and not bool(torch.isfinite(bank.logical[idx]).all())
        bank.bad = touched or unwritable or bank.value.shape[1] != d
    bank.bad |= unwritable
    args = {
        "bank": bank,
        "values": values,
        "indices": ints(data, "indices", idx, broken=bad == "indices", low=0, high=n),
        "momentum": scalar(
            data,
            "momentum",
            st.sampled_from([0.5, 0.0, 0.9, 1.0, np.float32(0.25)]),
            st.sampled_from([-0.1, 1.5, math.nan, math.inf, "0.5", True, None]),
            broken=bad == "momentum",
        ),
    }
    before = _snapshot(bank.value)
    kwargs = {k: a.value for k, a in args.items()}
    got = outcome(lambda: llp_fast.bank_update_(**kwargs), args)
    if got is None:
        after = _snapshot(bank.value)
        assert (before is None and after is None) or torch.equal(after, before), "a failed call wrote the bank"
        return
    assert got is bank.value
    want = brute.bank_update(
        bank.logical, args["indices"].logical, values.logical.to(bank_dtype), float(args["momentum"].value)
    )
    np.testing.assert_allclose(f64(bank.value).numpy(), want, rtol=0, atol=BANK_TOL[bank_dtype])
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[args["indices"].logical] = False
    torch.testing.assert_close(
        f64(bank.value)[untouched], bank.logical.double()[untouched], rtol=0, atol=0, equal_nan=True
    )


def _bank(data, n: int, d: int, dtype: torch.dtype, *, broken: bool) -> Arg:
    """A writable contiguous (N, D) bank, torch or NumPy; broken: a layout that cannot be written
    in place (transposed, sliced, expanded, reversed, byte-swapped, read-only), an inference
    tensor, or a broken matrix (wrong kind, rank, no columns)."""
    x = unit_rows(data, n, d, label="bank").to(dtype)
    if not broken:
        return placed(data, "bank", x, ("contiguous",))
    forms = ["read_only", "inference", "matrix", "byteswapped"]
    forms += ["transposed"] * (n > 1 and d > 1) + ["sliced", "expanded", "reversed"] * (n > 1)
    how = data.draw(st.sampled_from(forms), label="bank broken as")
    if how == "matrix":
        return matrix(data, "bank", n, d, dtype, broken=True, must_match_dtype=False)
    if how == "inference":
        with torch.inference_mode():
            t = x.clone()
        return Arg(t, bad=True)
    if how == "read_only":
        if dtype == torch.bfloat16:
            return Arg(x.to(torch.int32), bad=True)
        a = x.numpy().copy()
        a.setflags(write=False)
        return Arg(a, bad=True)
    container = "numpy" if how in ("reversed", "byteswapped") or dtype == torch.bfloat16 else "torch"
    value, _ = lay_out(x if container == "torch" or dtype != torch.bfloat16 else x.float(), how, container)
    return Arg(value, bad=True)


def _writable_contiguous(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.flags.c_contiguous and x.flags.writeable and x.dtype.isnative
    return isinstance(x, torch.Tensor) and x.is_contiguous() and not x.is_inference()


def _snapshot(x):
    if isinstance(x, np.ndarray):
        return f64(x)
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return None


def test_the_oracle_catches_a_wrong_vote():
    """The fuzz oracle itself: a hand-made propagate case passes, a wrong label fails."""
    q = torch.tensor([[1.0, 0.0]])
    lab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    cls = torch.tensor([0, 1, 1])
    labels, conf = llp_fast.propagate(q, lab, cls, k=2, tau=1.0, num_classes=2)
    propagate_oracle(q, lab, cls, None, 2, 1.0, labels, conf, eps=torch.finfo(torch.float32).eps)
    with pytest.raises(AssertionError):
        propagate_oracle(q, lab, cls, None, 2, 1.0, 1 - labels, conf, eps=torch.finfo(torch.float32).eps)
