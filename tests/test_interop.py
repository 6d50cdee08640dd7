"""NumPy in, NumPy out; CuPy in, CuPy out through DLPack (SPEC §2)."""

import numpy as np
import pytest
import torch
from conftest import unit

import llp_fast


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


def test_mixed_numpy_and_torch_follow_the_first_array():
    q, lab = unit(3, 4), unit(6, 4).numpy()
    cls = torch.tensor([0, 1, 0, 1, 0, 1])
    labels, _ = llp_fast.propagate(q, lab, cls, k=2, num_classes=2)
    assert isinstance(labels, np.ndarray)


def _cupy():
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy needs a CUDA GPU")
    return cupy


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
