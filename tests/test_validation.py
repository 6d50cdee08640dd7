"""docs/method.md §6: bad input raises ValueError/TypeError naming the argument; nothing is written."""

import subprocess
import sys
import warnings

import brute
import numpy as np
import pytest
import torch
from conftest import unit

import llp_fast

# hands the C++ extension malformed inputs: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated

# built at import, before the per-test seed: drawn from their own seeded generator, so that the messages
# the tests match (e.g. the largest |entry| of Q times 3e38) are the same on every run
_GEN = torch.Generator().manual_seed(0)
Q, L, CLS = unit(4, 6, gen=_GEN), unit(5, 6, gen=_GEN), torch.tensor([0, 1, 2, 0, 1])


def _nan(x):
    x = x.clone()
    x[0, 0] = float("nan")
    return x


PROPAGATE_CASES = [
    (dict(queries=Q[0]), ValueError, "queries must be 2-D"),
    (dict(queries=[[1.0]]), TypeError, "queries must be a torch.Tensor"),
    (dict(queries=unit(4, 7)), ValueError, "queries has D=7"),
    (dict(queries=Q.double()), TypeError, "queries is torch.float64"),
    (dict(queries=Q.long()), TypeError, "queries must be float32"),
    (dict(queries=_nan(Q)), ValueError, "queries contains NaN"),
    (dict(labeled=_nan(L)), ValueError, "labeled contains NaN"),
    (dict(labeled=torch.empty(0, 6)), ValueError, "labeled is empty"),
    (dict(k=6), ValueError, "k=6 exceeds the number of labeled points"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2.5), TypeError, "k must be an int"),
    (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
    (dict(tau=-1.0), ValueError, "tau must be"),
    (dict(labeled_classes=torch.tensor([0, 1, 2, 0, 3])), ValueError, "labeled_classes holds 3"),
    (dict(labeled_classes=torch.tensor([0, 1, -1, 0, 1])), ValueError, "labeled_classes holds -1"),
    (dict(labeled_classes=torch.tensor([0, 1, 2])), ValueError, "labeled_classes must have shape (5,)"),
    (dict(labeled_classes=CLS.float()), TypeError, "labeled_classes must have an integer dtype"),
    (dict(log_rho=torch.ones(4)), ValueError, "log_rho must have shape (5,)"),
    (dict(log_rho=torch.tensor([0.0, 1, float("inf"), 0, 0])), ValueError, "log_rho contains NaN or Inf"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    # torch's int64 type error, a Python OverflowError, torch's item() error on meta tensors
    (dict(num_classes=2**63), ValueError, "num_classes must be below 2"),
    (dict(tau=10**400), ValueError, "tau is beyond a float's range"),
    (dict(queries=Q.to("meta")), ValueError, "queries is on the meta device"),
    (dict(labeled_classes=CLS.to("meta")), ValueError, "labeled_classes is on the meta device"),
    # 1/tau is inf in float32: inf scores and NaN confidences (float64 inputs take it)
    (dict(tau=1e-40), ValueError, "tau=1e-40: 1/tau overflows torch.float32"),
    (dict(labeled_classes=CLS.to(torch.uint16)), TypeError, "cast wider unsigned ones to int64"),
    (dict(k=b"\x02\x03"), TypeError, "k must be an int or a sequence of ints"),
    (dict(k=np.array([2, 3])), TypeError, "k must be an int or a sequence of ints (a tuple or a list), got ndarray"),
    # torch's "Could not run 'aten::as_strided' with arguments from the 'SparseCPU' backend"
    (dict(queries=Q.to_sparse()), TypeError, "queries is a torch.sparse_coo tensor: pass a dense one"),
    (dict(labeled_classes=CLS.to_sparse()), TypeError, "labeled_classes is a torch.sparse_coo tensor"),
    (dict(labeled=L.to_sparse_csr()), TypeError, "labeled is a torch.sparse_csr tensor"),
    # it said "got a numpy array (convert it with torch.from_numpy)", which the op takes
    (dict(queries=np.float32(1.0)), TypeError, "queries must be an array or tensor, got the NumPy scalar"),
]
if torch.cuda.is_available():
    PROPAGATE_CASES.append((dict(queries=Q.cuda()), ValueError, "queries is on cuda"))


@pytest.mark.parametrize("change,exc,msg", PROPAGATE_CASES)
def test_propagate_rejects(change, exc, msg):
    args = dict(queries=Q, labeled=L, labeled_classes=CLS, log_rho=None, k=3, tau=0.07, num_classes=3)
    args.update(change)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        llp_fast.propagate(**args)


DENSITY_CASES = [
    (dict(t=9), ValueError, "t=9 exceeds the density pool size"),
    (dict(pool_mask=torch.tensor([True, False, False, True])), ValueError, "t=3 exceeds the density pool size \\(2\\)"),
    (dict(pool_mask=torch.zeros(4, dtype=torch.bool)), ValueError, "pool_mask selects no rows"),
    (dict(pool_mask=torch.ones(4)), TypeError, "pool_mask must have torch.bool"),
    (dict(pool_mask=torch.ones(3, dtype=torch.bool)), ValueError, "pool_mask must have shape"),
    (dict(bank=unit(4, 5)), ValueError, "bank has D=5"),
    (dict(bank=_nan(Q)), ValueError, "bank contains NaN"),
    (dict(labeled=torch.empty(0, 6)), ValueError, "labeled is empty"),
    (dict(tau=float("nan")), ValueError, "tau must be"),
]


@pytest.mark.parametrize("change,exc,msg", DENSITY_CASES)
def test_local_density_rejects(change, exc, msg):
    args = dict(labeled=L, bank=Q, t=3, tau=0.07, pool_mask=None)
    args.update(change)
    with pytest.raises(exc, match=msg):
        llp_fast.local_density(**args)


LOSS_CASES = [
    (dict(v=Q[:, :5]), ValueError, "v has D=5"),
    (dict(v=_nan(Q)), ValueError, "v contains NaN"),
    (dict(bank_labels=CLS[:4]), ValueError, "bank_labels must have shape"),
    (dict(targets=CLS), ValueError, "targets must have shape \\(4,\\)"),
    (dict(targets=CLS[:4].float()), TypeError, "targets must have an integer dtype"),
    (dict(tau=0), ValueError, "tau must be"),
    (dict(bank=L.bfloat16()), TypeError, "v is torch.float32 but bank is torch.bfloat16"),
]


@pytest.mark.parametrize("change,exc,msg", LOSS_CASES)
def test_aggregation_loss_rejects(change, exc, msg):
    args = dict(v=Q, bank=L, bank_labels=CLS, targets=CLS[:4], tau=0.07)
    args.update(change)
    with pytest.raises(exc, match=msg):
        llp_fast.aggregation_loss(**args)


UPDATE_CASES = [
    (dict(indices=torch.tensor([0, 5])), ValueError, "indices holds 5, outside \\[0, 5\\)"),
    (dict(indices=torch.tensor([-1, 2])), ValueError, "indices holds -1"),
    (dict(indices=torch.tensor([0.0, 1.0])), TypeError, "indices must have an integer dtype"),
    (dict(indices=torch.tensor([0, 1, 2])), ValueError, "indices must have shape \\(2,\\)"),
    (dict(values=torch.tensor([[0.0] * 6, [float("inf")] * 6])), ValueError, "values contains NaN or Inf"),
    (dict(values=unit(2, 3)), ValueError, "values has D=3"),
    (dict(momentum=1.5), ValueError, "momentum must lie in \\[0, 1\\]"),
    (dict(momentum=10**400), ValueError, "momentum is beyond a float's range"),
    (dict(bank=L.T.contiguous().T), ValueError, "bank must be contiguous"),
]


@pytest.mark.parametrize("change,exc,msg", UPDATE_CASES)
def test_bank_update_rejects_and_writes_nothing(change, exc, msg):
    args = dict(bank=L.clone(), indices=torch.tensor([0, 3]), values=unit(2, 6), momentum=0.5)
    args.update(change)
    before = args["bank"].clone()
    with pytest.raises(exc, match=msg):
        llp_fast.bank_update_(**args)
    assert torch.equal(args["bank"], before)


def test_a_meta_bank_is_refused_naming_it():
    with pytest.raises(ValueError, match="bank is on the meta device"):  # torch's item() error
        llp_fast.bank_update_(L.to("meta"), torch.tensor([0, 3]), unit(2, 6), momentum=0.5)


def test_nan_scores_are_never_selected_by_either_path():
    """Reachable only without the finiteness checks: the kernels' compares never pick a NaN
    score, and the reference (torch.topk, which ranks NaN first) now agrees."""
    from llp_fast.reference import topk_scores_ref

    q = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    keys = torch.tensor([[0.5, 0.0], [float("nan"), 0.0], [0.9, 0.0]])
    want_v = torch.tensor([[0.9, 0.5, -float("inf")], [-float("inf")] * 3])
    want_i = torch.tensor([[2, 0, -1], [-1, -1, -1]])
    got = llp_fast.topk_scores(q, keys, k=3, tau=1.0, check_finite=False)
    ref = topk_scores_ref(q, keys, 3, 1.0)
    for v, i in (got, ref):
        torch.testing.assert_close(v, want_v)
        assert torch.equal(i, want_i)


def test_numpy_arguments_are_validated_too():
    with pytest.raises(ValueError, match="k=9 exceeds"):
        llp_fast.propagate(Q.numpy(), L.numpy(), CLS.numpy(), k=9, num_classes=3)
    with pytest.raises(TypeError, match="bank has NumPy dtype <U1"):
        llp_fast.local_density(Q.numpy(), np.array([["a"]]), t=1)


# -- bank_update_ on a bank that cannot be written ------------------------------------------

_MEMMAP_SCRIPT = """
import sys, numpy as np, torch, llp_fast
path, wrap = sys.argv[1], sys.argv[2]
bank = np.load(path, mmap_mode="r")
if wrap == "torch":
    bank = torch.from_numpy(bank)
try:
    llp_fast.bank_update_(bank, np.array([0, 2]), np.ones((2, 6), np.float32))
except TypeError as e:
    print("TypeError:", e)
"""


@pytest.mark.parametrize("wrap", ["numpy", "torch"])
def test_bank_update_refuses_a_read_only_memmap(tmp_path, wrap):
    # In a child process: before the fix the kernel wrote to read-only pages (SIGSEGV).
    path = tmp_path / "bank.npy"
    before = L.numpy().copy()
    np.save(path, before)
    proc = subprocess.run(
        [sys.executable, "-c", _MEMMAP_SCRIPT, str(path), wrap], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("TypeError: bank ") and "read-only" in proc.stdout
    np.testing.assert_array_equal(np.load(path), before)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: (a.setflags(write=False), a)[1], id="writeable-false"),
        pytest.param(lambda a: np.broadcast_to(a[:1], a.shape), id="broadcast_to"),
        pytest.param(lambda a: np.frombuffer(a.tobytes(), np.float32).reshape(a.shape), id="frombuffer-bytes"),
    ],
)
def test_bank_update_refuses_a_read_only_array(make):
    bank = make(L.numpy().copy())
    before = bank.copy()
    with pytest.raises(TypeError, match="bank is a read-only NumPy array"):
        llp_fast.bank_update_(bank, np.array([0, 2]), np.ones((2, 6), np.float32))
    np.testing.assert_array_equal(bank, before)


def test_bank_update_refuses_an_inference_tensor_outside_inference_mode():
    # Before: the C++ kernel wrote it, the reference body raised torch's RuntimeError.
    with torch.inference_mode():
        bank = L.clone()
    before = bank.clone()
    with pytest.raises(TypeError, match="bank is an inference tensor"):
        llp_fast.bank_update_(bank, torch.tensor([0, 2]), unit(2, 6))
    assert torch.equal(bank, before)
    with torch.inference_mode():
        llp_fast.bank_update_(bank, torch.tensor([0, 2]), unit(2, 6))
    assert not torch.equal(bank, before)


@pytest.mark.parametrize(
    "bank",
    [
        pytest.param(L[:1].expand(5, 6), id="rows-expanded"),
        pytest.param(L[:, :1].expand(5, 6), id="columns-expanded"),
        pytest.param(L[::2], id="row-slice"),
    ],
)
def test_bank_update_refuses_a_bank_with_overlapping_or_gapped_rows(bank):
    before = bank.clone()
    with pytest.raises(ValueError, match="bank must be contiguous"):
        llp_fast.bank_update_(bank, torch.tensor([0, 1]), unit(2, 6))
    assert torch.equal(bank, before)


@pytest.mark.parametrize("impl", ["torch", "numpy"])
def test_bank_update_reads_values_that_view_the_bank_as_passed(impl):
    # values = bank[0:2] while row 1 is written first: the second update must blend the old row 1
    # (the sequential loop over the values as passed). Before, it read the row just written.
    bank = unit(5, 6, torch.float64)
    want = brute.bank_update(bank, [1, 0], bank[0:2].clone(), 0.5)
    if impl == "numpy":
        bank = bank.numpy()
    llp_fast.bank_update_(bank, np.array([1, 0]), bank[0:2], momentum=0.5)
    np.testing.assert_allclose(np.asarray(bank), want, rtol=0, atol=1e-12)


def test_read_only_arrays_are_fine_where_nothing_is_written():
    q, lab = unit(4, 6).numpy(), L.numpy()
    q.setflags(write=False)
    lab.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning does not apply here
        labels, _ = llp_fast.propagate(q, lab, CLS.numpy(), k=2, num_classes=3)
    assert labels.shape == (4,)


def test_bank_update_writes_a_writable_memmap_through_torch(tmp_path):
    # External memory that may be written (a read-write memory map) passes the read-only check,
    # on the first call (looked up) and on later ones (remembered).
    path = tmp_path / "bank.npy"
    np.save(path, L.numpy())
    bank = torch.from_numpy(np.load(path, mmap_mode="r+"))
    want = brute.bank_update(L, [0, 0], L[1:2].repeat(2, 1), 0.5)
    for _ in range(2):
        llp_fast.bank_update_(bank, torch.tensor([0]), L[1:2].clone())
    np.testing.assert_allclose(np.load(path), want, rtol=0, atol=1e-6)


# -- outputs never require grad --------------------------------------------------------------


@pytest.mark.parametrize("which", ["queries", "labeled", "log_rho"])
def test_propagate_outputs_do_not_require_grad(which):
    # Before: a log_rho that required grad gave a confidence that required grad, and backward
    # raised "no autograd formula was registered".
    args = dict(queries=Q.clone(), labeled=L.clone(), log_rho=torch.randn(5))
    args[which].requires_grad_()
    labels, conf = llp_fast.propagate(labeled_classes=CLS, k=3, num_classes=3, **args)
    assert not labels.requires_grad and not conf.requires_grad
    want = llp_fast.propagate(Q, L, CLS, args["log_rho"].detach(), k=3, num_classes=3)
    assert torch.equal(labels, want[0]) and torch.equal(conf, want[1])


@pytest.mark.parametrize("which", ["labeled", "bank"])
def test_local_density_output_does_not_require_grad(which):
    args = dict(labeled=L.clone(), bank=Q.clone())
    args[which].requires_grad_()
    log_rho = llp_fast.local_density(t=3, **args)
    assert not log_rho.requires_grad
    # A density with grad history still propagates (what a caller might feed back).
    labels, conf = llp_fast.propagate(Q, L, CLS, log_rho * torch.ones(1, requires_grad=True), k=3, num_classes=3)
    assert not conf.requires_grad


# -- defects the fuzzer (tests/test_fuzz_ops.py) found ----------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: np.ascontiguousarray(a[::-1])[::-1], id="reversed"),
        pytest.param(lambda a: a.astype(a.dtype.newbyteorder("S")), id="byteswapped"),
        pytest.param(lambda a: _field(a), id="record-field-stride"),
    ],
)
def test_numpy_views_torch_cannot_take_are_read_through_a_copy(make):
    # Before: torch.from_numpy's ValueError, naming no argument.
    q, lab = Q.numpy(), L.numpy()
    want = llp_fast.propagate(q, lab, CLS.numpy(), k=3, num_classes=3)
    got = llp_fast.propagate(make(q), make(lab), make(CLS.numpy()), k=3, num_classes=3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _field(a: np.ndarray) -> np.ndarray:
    """``a`` as a field of a record array: strides of 5 bytes per item more than the item."""
    rec = np.zeros(a.shape, dtype=[("x", a.dtype), ("pad", "i1")])
    rec["x"] = a
    return rec["x"]


@pytest.mark.parametrize(
    "make,exc,msg",
    [
        (lambda a: np.ascontiguousarray(a[::-1])[::-1], ValueError, "bank must be contiguous"),
        (lambda a: a.astype(a.dtype.newbyteorder("S")), TypeError, "bank has non-native byte order"),
    ],
)
def test_bank_update_refuses_a_numpy_bank_torch_cannot_view(make, exc, msg):
    bank = make(L.numpy().copy())
    before = bank.copy()
    with pytest.raises(exc, match=msg):
        llp_fast.bank_update_(bank, np.array([0, 2]), np.ones((2, 6), np.float32))
    np.testing.assert_array_equal(bank, before)


def test_a_numpy_dtype_torch_lacks_is_named():
    with pytest.raises(TypeError, match="queries has NumPy dtype float128"):
        llp_fast.propagate(Q.numpy().astype(np.longdouble), L.numpy(), CLS.numpy(), k=3, num_classes=3)


def test_a_loss_with_a_gradient_stays_torch_with_numpy_labels():
    # Before: the NumPy targets made the loss a NumPy array, and the gradient was lost.
    v = Q.clone().requires_grad_()
    loss = llp_fast.aggregation_loss(v, L, CLS.numpy(), CLS[:4].numpy())
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    loss.sum().backward()
    assert v.grad is not None and bool(torch.isfinite(v.grad).all())
    plain = llp_fast.aggregation_loss(Q, L, CLS.numpy(), CLS[:4].numpy())
    assert isinstance(plain, torch.Tensor)  # torch in, torch out, with a gradient or without
    assert isinstance(llp_fast.aggregation_loss(Q.numpy(), L.numpy(), CLS.numpy(), CLS[:4].numpy()), np.ndarray)


SCORE_CASES = [
    # (call, message): finite inputs whose scores overflow; each gave NaN results before.
    (lambda: llp_fast.propagate(Q, L, CLS, k=3, tau=1e-40, num_classes=3), "tau=1e-40"),
    (
        lambda: llp_fast.propagate(Q * 1e38, L, CLS, k=3, num_classes=3),
        r"\|queries\| <= \d\.\d+e\+37, \|labeled\| <= 0\.",
    ),
    (
        lambda: llp_fast.propagate(Q, L, CLS, torch.full((5,), 1e300, dtype=torch.float64), k=3, num_classes=3),
        "log_rho",
    ),
    (lambda: llp_fast.local_density(L, Q, t=2, tau=1e-45), "tau"),
    (lambda: llp_fast.local_density(L, Q * 3e38, t=2), r"\|bank\| <= 2\.\d+e\+38"),
    (lambda: llp_fast.aggregation_loss(Q * 1e20, L * 1e20, CLS, CLS[:4]), "v . bank / tau"),
]


@pytest.mark.parametrize("call,msg", SCORE_CASES)
def test_scores_beyond_the_compute_dtype_are_refused(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_the_same_scores_are_fine_in_float64():
    # At tau = 1e-40 the nearest labeled point outweighs the others: the vote is its class.
    labels, conf = llp_fast.propagate(Q.double(), L.double(), CLS, k=3, tau=1e-40, num_classes=3)
    nearest = llp_fast.propagate(Q.double(), L.double(), CLS, k=1, num_classes=3)[0]
    assert torch.equal(labels, nearest) and torch.equal(conf, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "bank_dtype,values",
    [
        (torch.float32, torch.full((2, 6), 1e300, dtype=torch.float64)),  # inf once cast
        (torch.float16, torch.full((2, 6), 1e5)),  # inf once cast
        (torch.float32, torch.full((2, 6), 1e30)),  # the norm of the blend overflows
        (torch.float64, torch.full((2, 6), 1e300, dtype=torch.float64)),
    ],
)
def test_bank_update_refuses_values_the_bank_cannot_blend(bank_dtype, values):
    # Before: finite values, NaN rows in the bank.
    bank = L.to(bank_dtype)
    before = bank.clone()
    with pytest.raises(ValueError, match="values holds entries up to"):
        llp_fast.bank_update_(bank, torch.tensor([0, 2]), values)
    assert torch.equal(bank, before)
    ok = values / values.abs().max() * 10  # large but within range: blended and normalized
    llp_fast.bank_update_(bank, torch.tensor([0, 2]), ok)
    torch.testing.assert_close(bank[[0, 2]].double().norm(dim=1), torch.ones(2, dtype=torch.float64), atol=2e-3, rtol=0)


def test_a_tau_whose_inverse_overflows_is_refused_even_without_scores():
    # Found by the fuzzer: with no queries no score overflowed, and tau=1e-320 passed.
    with pytest.raises(ValueError, match="tau must be a finite number > 0 with a finite inverse"):
        llp_fast.propagate(Q[:0], L, CLS, k=3, tau=1e-320, num_classes=3)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_bank_update_refuses_bank_rows_it_cannot_blend(fill):
    # Found by the fuzzer: NaN/Inf bank rows were blended into NaN, finite 1e30 rows into NaN
    # (the norm overflowed). Only the rows the call blends are read; the others may hold anything.
    bank = L.clone()
    bank[2] = fill
    before = bank.clone()
    with pytest.raises(ValueError, match="bank"):
        llp_fast.bank_update_(bank, torch.tensor([0, 2]), unit(2, 6))
    torch.testing.assert_close(bank, before, rtol=0, atol=0, equal_nan=True)
    llp_fast.bank_update_(bank, torch.tensor([0, 1]), unit(2, 6))
    assert bool(torch.isfinite(bank[[0, 1]]).all())


def test_an_array_where_only_torch_is_taken_is_named_as_such():
    # Before: "labels must be a torch.Tensor, numpy.ndarray or cupy.ndarray, got ndarray".
    bank = llp_fast.MemoryBank(torch.tensor([0, -1, 1, -1]), 2, dim=3)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor here, got a numpy array \(convert it with"):
        bank.set_labels(torch.tensor([1]), np.array([0]), torch.tensor([0.5]))


def test_dot_products_that_overflow_before_the_division_by_tau_are_refused():
    """With tau > 1 the check bounded the score (dot / tau) alone, and the dot product, formed
    first, overflowed: inf values, keys dropped as padding, NaN confidences and losses, no error."""
    q = torch.tensor([[1e20], [-1e20]])
    k = torch.tensor([[1e19], [5e18], [-1e19]])
    calls = [
        lambda: llp_fast.topk_scores(q, k, k=2, tau=100.0),
        lambda: llp_fast.local_density(q, k, t=2, tau=100.0),
        lambda: llp_fast.propagate(q, k, torch.tensor([0, 1, 1]), None, k=2, tau=100.0, num_classes=2),
        lambda: llp_fast.aggregation_loss(q, k, torch.tensor([0, 1, 1]), torch.tensor([0, 1]), tau=100.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"dot products .* \(before / tau\) may reach 1e\+39"):
            call()
    top = llp_fast.topk_scores(q / 1e10, k / 1e10, k=2, tau=100.0)  # within range: finite, nothing dropped
    assert bool(torch.isfinite(top.values).all()) and bool((top.indices >= 0).all())


def test_a_second_derivative_through_the_aggregation_loss_is_named():
    """A gradient penalty through aggregation_loss was torch's "no autograd formula was registered"
    for llp_fast.aggregation_loss_backward, an op the user never called."""
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    loss = llp_fast.aggregation_loss(v, bank, torch.arange(10) % 3, torch.tensor([0, 1, 2]), tau=0.5).sum()
    (g,) = torch.autograd.grad(loss, v, create_graph=True)
    with pytest.raises(NotImplementedError, match="aggregation_loss has no second derivative"):
        g.sum().backward()
