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
    INTS,
    READ_LAYOUTS_1D,
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
from llp_fast.ops.topk_scores import TopK

pytestmark = pytest.mark.isolated

EXAMPLES = examples(300)
SIZES = st.sampled_from([1, 2, 3, 5])  # rows of an input that must not be empty
ANY_SIZE = st.sampled_from([0, 1, 2, 5])
DIMS = st.sampled_from([1, 2, 3, 8])


def _numpy_in(args: dict, names) -> bool:
    """Whether the op answers in NumPy: a NumPy array among ``names`` and no torch tensor among any
    argument (a torch pair as ``init`` too): any torch tensor in, torch out."""

    def torch_in(v) -> bool:
        return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(torch_in(t) for t in v))

    numpy = any(isinstance(args[n].value, np.ndarray) for n in names)
    return numpy and not any(torch_in(a.value) for a in args.values())


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


def _log_rho(data, m: int, *, broken: bool, name: str = "log_rho") -> Arg:
    """None, or (M,) densities (or another float vector, ``name``) of a drawn float dtype
    (sometimes requiring grad); broken: NaN/Inf, wrong length, wrong rank, wrong kind."""
    values = torch.randn(m, dtype=torch.float64, generator=generator(data, name)) * 2
    if broken:
        how = data.draw(st.sampled_from(["long", "rank2", "kind"] + ["nonfinite"] * (m > 0)), label=f"{name} broken as")
        if how == "long":
            return Arg(torch.zeros(m + 1), bad=True)
        if how == "rank2":
            return Arg(values[:, None].float(), bad=True)
        if how == "kind":
            return wrong_kind(data, name, (m,), want="float")
        values[data.draw(st.integers(0, m - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        arg = placed(data, name, values.float(), ("contiguous", "sliced", "reversed"))
        arg.bad = True
        return arg
    how = data.draw(st.sampled_from(["none", "array", "grad"]), label=f"{name} as")
    if how == "none":
        return Arg(None, None)
    t = values.to(data.draw(st.sampled_from(FLOATS), label=f"{name} dtype"))
    if how == "grad":
        return Arg(t.clone().requires_grad_(), t)
    return placed(data, name, t, ("contiguous", "sliced", "reversed", "byteswapped"))


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


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_topk_scores(data):
    names = ("queries", "keys", "k", "tau", "bias", "key_mask", "init", "index_offset")
    bad = broken(data, names)
    q_rows, n, d = data.draw(ANY_SIZE, label="Q"), data.draw(ANY_SIZE, label="N"), data.draw(DIMS, label="D")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    args = {
        "queries": matrix(data, "queries", q_rows, d, dtype, broken=bad == "queries"),
        "keys": matrix(data, "keys", n, d, dtype, broken=bad == "keys"),  # N = 0 is allowed
        "k": scalar(data, "k", st.integers(1, n + 2), BAD_COUNTS, broken=bad == "k"),  # k > N pads
        "tau": scalar(data, "tau", TAUS, BAD_TAUS, broken=bad == "tau", edge=EDGE_TAUS),
        "bias": _bias(data, n, broken=bad == "bias"),
        "key_mask": _key_mask(data, n, broken=bad == "key_mask"),
        "index_offset": scalar(
            data,
            "index_offset",
            st.sampled_from([0, 1, 7, 2**40]),
            # past the int64 range of the global indices: the last key's, or the offset itself
            st.sampled_from([-1, -(2**40), 2.0, True, "0", None, 2**63 - n + 1, 2**63]),
            broken=bad == "index_offset",
        ),
    }
    k, offset = args["k"].value, args["index_offset"].value
    if args["k"].bad:
        args["init"] = Arg(None)
    else:
        low = n + (offset if not args["index_offset"].bad else 0)  # an earlier call's keys: other ids
        mine = low - 1 if n and not args["index_offset"].bad else None  # this call's last key
        args["init"] = _init(data, q_rows, k, low, broken=bad == "init", mine=mine)
    queries = args["queries"].value
    if isinstance(queries, torch.Tensor) and queries.dtype in FLOATS and data.draw(st.booleans(), label="grad"):
        args["queries"].value = queries.detach().clone().requires_grad_()
    kwargs = {name: a.value for name, a in args.items()}
    got = outcome(lambda: llp_fast.topk_scores(**kwargs), args)
    if got is None:
        return
    assert isinstance(got, TopK)
    values, indices = got
    kind = np.ndarray if _numpy_in(args, ("queries", "keys", "bias", "key_mask")) else torch.Tensor
    assert isinstance(values, kind) and isinstance(indices, kind)
    assert values.shape == indices.shape == (q_rows, k)
    assert _dtype_of(values) == _float_out(dtype) and _dtype_of(indices) == torch.int64
    assert not (isinstance(values, torch.Tensor) and values.requires_grad)
    init = args["init"].logical
    topk_oracle(
        args["queries"].logical,
        args["keys"].logical,
        args["bias"].logical,
        args["key_mask"].logical,
        init,
        k,
        args["tau"].value,
        offset,
        f64(values),
        f64(indices).long(),
        eps=torch.finfo(_float_out(dtype)).eps,
    )


def _bias(data, n: int, *, broken: bool) -> Arg:
    """``_log_rho``'s draws, as ``bias``; broken also as finite magnitudes at the edge of the
    float32 scores (a maybe: refused naming bias, or added)."""
    if broken and n and data.draw(st.booleans(), label="bias huge"):
        scale = data.draw(st.sampled_from([1e30, 1e37, 1e38]), label="bias scale")
        t = torch.randn(n, dtype=torch.float64, generator=generator(data, "bias")) * scale
        arg = placed(data, "bias", t.to(data.draw(st.sampled_from([torch.float32, torch.float64]))), ("contiguous",))
        arg.maybe = True
        return arg
    return _log_rho(data, n, broken=broken, name="bias")


def _key_mask(data, n: int, *, broken: bool) -> Arg:
    """None, or an (N,) bool mask (all False too: then every row is padding) in a drawn layout;
    broken: wrong length, wrong rank, wrong kind."""
    if broken:
        how = data.draw(st.sampled_from(["long", "rank2", "kind"] + ["short"] * (n > 0)), label="key_mask broken as")
        if how == "long":
            return Arg(torch.ones(n + 1, dtype=torch.bool), bad=True)
        if how == "short":
            return Arg(np.ones(n - 1, dtype=bool), bad=True)
        if how == "rank2":
            return Arg(torch.ones(1, n, dtype=torch.bool), bad=True)
        return wrong_kind(data, "key_mask", (n,), want="bool")
    if not data.draw(st.booleans(), label="key_mask given"):
        return Arg(None, None)
    keep = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="key_mask density")
    mask = torch.rand(n, generator=generator(data, "key_mask")) < keep
    return placed(data, "key_mask", mask, READ_LAYOUTS_1D)


def _init(data, q_rows: int, k: int, low: int, *, broken: bool, mine: int | None = None) -> Arg:
    """None, or ``(values, indices)`` (Q, k) as an earlier call over other keys gives them: per
    row distinct ids from ``low`` on, values with exact ties among them, and -inf/-1 padding at
    drawn places, each in a drawn dtype and container, as a tuple or a list. Broken: not a pair,
    a wrong shape or kind, NaN/+Inf values, an index < -1, padding that does not match, an index
    twice in a row, an index of this call's keys (``mine``)."""
    if not broken and not data.draw(st.booleans(), label="init given"):
        return Arg(None, None)
    g = generator(data, "init")
    ids = torch.zeros(q_rows, k, dtype=torch.int64)
    for r in range(q_rows):
        ids[r] = torch.randperm(k + 3, generator=g)[:k] + low
    scale = data.draw(st.sampled_from([1.0, 10.0, 1000.0]), label="init scale")
    values = torch.randint(-6, 7, (q_rows, k), generator=g).double() / 2 * scale
    pad = torch.rand(q_rows, k, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="init padding")
    values[pad], ids[pad] = -math.inf, -1
    v_dtype = data.draw(st.sampled_from(FLOATS), label="init values dtype")
    fits = [t for t in INTS if _int_holds(t, ids)]  # uint8 where there is no -1 padding
    i_dtype = data.draw(st.sampled_from(fits), label="init indices dtype")
    values, ids = values.to(v_dtype), ids.to(i_dtype)
    how = "valid"
    if broken:
        forms = ["not_pair", "triple", "values_shape", "indices_shape", "values_kind", "indices_kind", "object"]
        forms += ["nonfinite", "below", "unpadded", "padded"] * (q_rows * k > 0)
        forms += ["repeat"] * (q_rows > 0 and k > 1) + ["overlap"] * (q_rows * k > 0 and mine is not None)
        how = data.draw(st.sampled_from(forms), label="init broken as")
    at = (data.draw(st.integers(0, max(q_rows - 1, 0))), data.draw(st.integers(0, k - 1)))
    if how == "not_pair":
        return Arg(data.draw(st.sampled_from([values, "init", 3, (values,)]), label="init as"), bad=True)
    if how == "triple":
        return Arg((values, ids, ids), bad=True)
    if how == "values_shape":
        values = torch.zeros(q_rows, k + 1, dtype=v_dtype)
    elif how == "indices_shape":
        ids = data.draw(st.sampled_from([ids[None], ids.reshape(-1), torch.zeros(q_rows + 1, k, dtype=torch.int64)]))
    elif how == "values_kind":
        values = data.draw(st.sampled_from([values.long(), values.bool(), values.tolist()]), label="init values as")
    elif how == "indices_kind":
        ids = data.draw(st.sampled_from([ids.double(), ids.bool(), ids.tolist()]), label="init indices as")
    elif how == "object":
        values = np.zeros((q_rows, k), dtype=object)
    elif how == "nonfinite":
        values, ids = values.clone(), ids.clone()
        values[at] = data.draw(st.sampled_from([math.nan, math.inf]), label="init nonfinite")
        ids[at] = 0
    elif how in ("below", "unpadded", "padded", "repeat", "overlap"):
        values, ids = values.to(torch.float32), ids.to(torch.int64)
        if how == "repeat":
            values[at[0], :2], ids[at[0], :2] = 1.0, low + k + 5
        elif how == "overlap":
            values[at], ids[at] = 1.0, mine
        elif how == "below":
            values[at], ids[at] = 1.0, data.draw(st.sampled_from([-2, -(2**40)]), label="init index")
        elif how == "unpadded":  # -inf with a real index
            values[at], ids[at] = -math.inf, low
        else:  # a finite value with the padding index
            values[at], ids[at] = 1.0, -1
    value_container = data.draw(st.sampled_from(["torch", "numpy"]), label="init values container")
    index_container = data.draw(st.sampled_from(["torch", "numpy"]), label="init indices container")
    pair = [_container(values, value_container), _container(ids, index_container)]
    pair = tuple(pair) if data.draw(st.booleans(), label="init as tuple") else pair
    return Arg(pair, (values, ids) if how == "valid" else None, bad=how != "valid")


def _container(x, container: str):
    if isinstance(x, torch.Tensor) and container == "numpy" and x.dtype != torch.bfloat16:
        return x.numpy()
    return x


def _int_holds(dtype: torch.dtype, values: torch.Tensor) -> bool:
    info = torch.iinfo(dtype)
    return not values.numel() or (info.min <= int(values.min()) and int(values.max()) <= info.max)


def topk_oracle(queries, keys, bias, mask, init, k, tau, offset, values, indices, *, eps):
    """Checks (values, indices) of topk_scores against float64 scores, within the rounding of the
    compute dtype (``eps``): a score of magnitude S is off by about (D + 2) * eps * S, so where
    candidates are that close either may be kept. Each row holds min(k, candidates) real entries
    (the keys where ``mask`` is set, ids ``offset + j``, and ``init``'s unpadded entries), then
    -inf/-1 padding; the values are within the rounding of the float64 top-k, each index is a
    candidate whose float64 score is within it of its value, no index twice, the values are sorted
    descending and exactly equal values come by the lower index."""
    q64, k64 = queries.double(), keys.double()
    n_q, n = q64.shape[0], k64.shape[0]
    scores = q64 @ k64.T / tau
    size = 1.0 + (float(q64.norm(dim=1).max() * k64.norm(dim=1).max()) / tau if n_q and n else 0.0)
    if bias is not None:
        scores = scores + bias.double()
        size += float(bias.double().abs().max()) if n else 0.0
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask.bool()
    ids = torch.arange(n, dtype=torch.int64) + offset
    if init is not None:
        init_v, init_i = init[0].double(), init[1].long()
        finite = init_v[torch.isfinite(init_v)]
        size += float(finite.abs().max()) if finite.numel() else 0.0
    err = 4 * (k64.shape[1] + 2) * eps * size
    for r in range(n_q):
        cand = {int(i): float(s) for i, s, m in zip(ids, scores[r], keep) if m}
        if init is not None:
            cand.update({int(i): float(v) for i, v in zip(init_i[r], init_v[r]) if int(i) >= 0})
        real = min(k, len(cand))
        want = sorted(cand.values(), reverse=True)[:real]
        got_v, got_i = values[r], indices[r]
        assert bool((got_i[real:] == -1).all()) and bool((got_v[real:] == -math.inf).all()), (r, got_v, got_i)
        np.testing.assert_allclose(got_v[:real].numpy(), np.array(want), rtol=0, atol=err)
        chosen = got_i[:real].tolist()
        assert len(set(chosen)) == real and all(i in cand for i in chosen), (r, chosen, sorted(cand))
        rescored = np.array([cand[i] for i in chosen])
        np.testing.assert_allclose(got_v[:real].numpy(), rescored, rtol=0, atol=err)
        assert bool((got_v[:-1] >= got_v[1:]).all()), (r, got_v)
        tied = (got_v[:-1] == got_v[1:]) & torch.isfinite(got_v[:-1])
        assert bool((got_i[:-1] < got_i[1:])[tied].all()), (r, got_v, got_i)


@settings(max_examples=examples(150), deadline=None)
@given(st.data())
def test_topk_scores_chunked_with_init_is_one_call(data):
    """Chunks of the keys, taken in any order, each call merging into the last one's result
    (``init``, ``index_offset`` its first row), give exactly the one call (CPU scores do not depend
    on the chunking), NumPy results fed back as ``init`` included; N = 530 crosses the CPU
    kernel's tile of 512 keys. Except in float64 across a whole tile, where the BLAS product of
    a 512-key tile and of a smaller chunk may round a score differently (by an ulp): there the
    chunked result must be a right top-k (the fuzz oracle) with the one call's values."""
    q_rows, d = data.draw(ANY_SIZE, label="Q"), data.draw(DIMS, label="D")
    n = data.draw(ANY_SIZE | st.just(530), label="N")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    k = data.draw(st.integers(1, n + 2), label="k")
    tau = data.draw(TAUS, label="tau")
    base = data.draw(st.sampled_from([0, 3, 2**40]), label="index_offset")
    container = data.draw(st.sampled_from(["torch", "numpy"]), label="container")
    queries = _container(unit_rows(data, q_rows, d, label="queries").to(dtype), container)
    keys = unit_rows(data, n, d, label="keys").to(dtype)
    if n and data.draw(st.booleans(), label="tied keys"):
        keys[data.draw(st.integers(0, n - 1)) :] = keys[0].clone()  # equal scores: the lower index first
    bias = _log_rho(data, n, broken=False, name="bias").logical
    mask = _key_mask(data, n, broken=False).logical
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
    chunks = list(zip([0, *cuts], [*cuts, n]))
    chunks = data.draw(st.permutations(chunks), label="chunk order")

    def call(a, b, init):
        part = [None if x is None else _container(x[a:b], container) for x in (bias, mask)]
        return llp_fast.topk_scores(
            queries,
            _container(keys[a:b], container),
            k=k,
            tau=tau,
            bias=part[0],
            key_mask=part[1],
            init=init,
            index_offset=base + a,
        )

    one = call(0, n, None)
    state = None
    for a, b in chunks:
        state = call(a, b, state)
    if dtype == torch.float64 and n >= 512:
        eps, want = torch.finfo(torch.float64).eps, f64(one.values)
        finite = want[torch.isfinite(want)]
        err = 4 * (d + 2) * eps * (1 + (float(finite.abs().max()) if finite.numel() else 0.0))
        np.testing.assert_allclose(f64(state.values).numpy(), want.numpy(), rtol=0, atol=err)
        logical = [x if isinstance(x, torch.Tensor) else torch.from_numpy(x) for x in (queries, keys)]
        topk_oracle(*logical, bias, mask, None, k, tau, base, f64(state.values), f64(state.indices).long(), eps=eps)
        return
    np.testing.assert_array_equal(f64(state.values).numpy(), f64(one.values).numpy())
    np.testing.assert_array_equal(f64(state.indices).numpy(), f64(one.indices).numpy())


def test_the_oracle_catches_a_wrong_vote():
    """The fuzz oracle itself: a hand-made propagate case passes, a wrong label fails."""
    q = torch.tensor([[1.0, 0.0]])
    lab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    cls = torch.tensor([0, 1, 1])
    labels, conf = llp_fast.propagate(q, lab, cls, k=2, tau=1.0, num_classes=2)
    propagate_oracle(q, lab, cls, None, 2, 1.0, labels, conf, eps=torch.finfo(torch.float32).eps)
    with pytest.raises(AssertionError):
        propagate_oracle(q, lab, cls, None, 2, 1.0, 1 - labels, conf, eps=torch.finfo(torch.float32).eps)


def test_the_topk_oracle_catches_a_wrong_index():
    """The fuzz oracle of topk_scores: a hand-made case passes; a key that is not among the k
    best, a swapped tie and a missing padding fail."""
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    values, indices = llp_fast.topk_scores(q, keys, k=4, tau=1.0)
    eps = torch.finfo(torch.float32).eps
    topk_oracle(q, keys, None, None, None, 4, 1.0, 0, values.double(), indices, eps=eps)
    for wrong in ([1, 0, 2, -1], [2, 0, 1, -1], [0, 2, 1, 1]):
        with pytest.raises(AssertionError):
            topk_oracle(q, keys, None, None, None, 4, 1.0, 0, values.double(), torch.tensor([wrong]), eps=eps)
