"""NumPy in, NumPy out; CuPy in, CuPy out through DLPack (docs/method.md §2)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import unit

import llp_fast

# NumPy arrays of every layout through the C++ extension: a native crash fails these tests, not the run
pytestmark = pytest.mark.isolated


def test_numpy_round_trip():
    q, lab = unit(9, 5).numpy(), unit(12, 5).numpy()
    cls = np.random.randint(0, 3, 12)
    log_rho = llp_fast.local_density(lab, q, t=4)
    assert isinstance(log_rho, np.ndarray) and log_rho.dtype == np.float32 and log_rho.shape == (12,)
    labels, conf = llp_fast.propagate(q, lab, cls, log_rho, k=3, num_classes=3)
    assert isinstance(labels, np.ndarray) and labels.dtype == np.int64 and conf.dtype == np.float32
    want = llp_fast.propagate(
        torch.from_numpy(q), torch.from_numpy(lab), torch.from_numpy(cls), torch.from_numpy(log_rho), k=3, num_classes=3
    )
    np.testing.assert_array_equal(labels, want[0].numpy())
    np.testing.assert_array_equal(conf, want[1].numpy())
    loss = llp_fast.aggregation_loss(q, lab, cls, cls[:9])
    assert isinstance(loss, np.ndarray) and loss.shape == (9,)


def test_a_call_with_any_torch_tensor_returns_torch():
    """Embeddings in torch with labels from NumPy got NumPy back, and aggregation_loss returned torch
    while v required grad and NumPy under no_grad: the same call, two types."""
    q, lab = unit(3, 4), unit(6, 4).numpy()
    cls = np.array([0, 1, 0, 1, 0, 1])
    labels, conf = llp_fast.propagate(q, lab, cls, k=2, num_classes=2)
    assert isinstance(labels, torch.Tensor) and isinstance(conf, torch.Tensor)
    v = unit(2, 4).requires_grad_()
    bank = unit(6, 4)
    assert isinstance(llp_fast.aggregation_loss(v, bank, cls, cls[:2]), torch.Tensor)
    with torch.no_grad():
        assert isinstance(llp_fast.aggregation_loss(v, bank, cls, cls[:2]), torch.Tensor)
    assert isinstance(llp_fast.local_density(unit(3, 4).numpy(), lab, t=2), np.ndarray)  # arrays only: arrays
    first = llp_fast.topk_scores(unit(3, 4), unit(6, 4), k=2)  # a torch pair as init: torch
    more = llp_fast.topk_scores(unit(3, 4).numpy(), unit(5, 4).numpy(), k=2, init=first, index_offset=6)
    assert isinstance(more[0], torch.Tensor) and isinstance(more[1], torch.Tensor)


def _cupy():
    """CuPy, where it and torch can both reach a GPU; otherwise the test skips, saying why."""
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy arrays need a CUDA GPU and a CUDA build of torch; torch.cuda.is_available() is False")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy's CUDA runtime cannot use this driver or GPU
        pytest.skip(f"CuPy cannot use the GPU here: {type(e).__name__}: {e}")
    return cupy


class _CudaArray:
    """What torch.from_dlpack sees of a CuPy array on GPU 0 (a real one cannot be made without a
    GPU: CuPy raises CUDARuntimeError on creation). Recognised as CuPy by its type's module."""

    __module__ = "cupy._core.core"

    def __init__(self, a: np.ndarray):
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, **kwargs):
        raise AssertionError("torch must not get this far without CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error torch without CUDA would give")
@pytest.mark.parametrize("op", ["propagate", "local_density", "aggregation_loss", "bank_update_"])
def test_a_cupy_array_without_cuda_is_one_clear_error(op):
    # Before: torch.from_dlpack's "AssertionError: Torch not compiled with CUDA enabled".
    x, lab, cls = _CudaArray(np.ones((3, 4), np.float32)), unit(5, 4).numpy(), np.zeros(5, np.int64)
    calls = {
        "propagate": lambda: llp_fast.propagate(x, lab, cls, k=2, num_classes=1),
        "local_density": lambda: llp_fast.local_density(lab, x, t=2),
        "aggregation_loss": lambda: llp_fast.aggregation_loss(x, lab, cls, cls[:3]),
        "bank_update_": lambda: llp_fast.bank_update_(x, np.array([0]), lab[:1]),
    }
    with pytest.raises(
        TypeError, match=r"^\w+ is a CuPy array, and CuPy arrays need CUDA, which torch .* not have here"
    ):
        calls[op]()


_NO_CUDA_SCRIPT = """
import sys
import numpy as np, torch
if sys.argv[1] == "cupy-first":
    import cupy  # importable without a GPU; only creating an array needs one
import llp_fast
q = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
cls = torch.arange(10) % 3
for lab, c, qq in ((q[:10], cls, q), (q[:10].numpy(), cls.numpy(), q.numpy())):
    log_rho = llp_fast.local_density(lab, qq, t=4)
    llp_fast.propagate(qq, lab, c, log_rho, k=3, num_classes=3)
    llp_fast.aggregation_loss(qq[:4], qq, np.arange(20) % 3, np.arange(4) % 3)
    llp_fast.bank_update_(qq, np.array([1, 2]), qq[:2] * 1)
bank = llp_fast.MemoryBank(torch.tensor([0, -1, 1, -1, 2, -1]), 3, dim=8)
bank.refresh_density(t=2)
bank.step(torch.tensor([1, 3]), torch.nn.functional.normalize(torch.randn(2, 8), dim=1), k=2)
print("cupy imported:", "cupy" in sys.modules, "cuda initialised:", torch.cuda.is_initialized())
"""


@pytest.mark.parametrize("order", ["llp-fast-only", "cupy-first"])
def test_cpu_paths_never_touch_cuda_or_cupy(order):
    # With cupy-cuda12x installed (the dev extra) on a machine without a GPU: import llp_fast and
    # every CPU op, NumPy or torch, run; llp_fast imports no CuPy and initialises no CUDA.
    if order == "cupy-first":
        pytest.importorskip("cupy")
    proc = subprocess.run([sys.executable, "-c", _NO_CUDA_SCRIPT, order], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_cupy = order == "cupy-first"
    assert f"cupy imported: {want_cupy} cuda initialised: False" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.cuda
def test_cupy_round_trip_is_zero_copy():
    cupy = _cupy()
    q = cupy.asarray(unit(64, 16).numpy())
    lab = cupy.asarray(unit(100, 16).numpy())
    cls = cupy.asarray(np.random.randint(0, 5, 100))
    log_rho = llp_fast.local_density(lab, q, t=8)
    assert isinstance(log_rho, cupy.ndarray)
    labels, conf = llp_fast.propagate(q, lab, cls, log_rho, k=4, num_classes=5)
    assert isinstance(labels, cupy.ndarray) and isinstance(conf, cupy.ndarray)
    want = llp_fast.propagate(
        torch.from_numpy(cupy.asnumpy(q)),
        torch.from_numpy(cupy.asnumpy(lab)),
        torch.from_numpy(cupy.asnumpy(cls)),
        torch.from_numpy(cupy.asnumpy(log_rho)),
        k=4,
        num_classes=5,
    )
    np.testing.assert_array_equal(cupy.asnumpy(labels), want[0].numpy())
    bank = cupy.asarray(unit(10, 16).numpy())
    ptr = bank.data.ptr
    out = llp_fast.bank_update_(bank, cupy.asarray([1, 2]), cupy.asarray(unit(2, 16).numpy()))
    assert out is bank and bank.data.ptr == ptr
    np.testing.assert_allclose(cupy.asnumpy(cupy.linalg.norm(bank, axis=1)), 1.0, rtol=1e-5)
