"""llp_fast.bank_update_: the in-place blend, against the sequential loop (docs/method.md §1.6)."""

import numpy as np
import pytest
import torch
from brute import bank_update as brute_update
from conftest import unit

import llp_fast
from llp_fast.reference import bank_update_ref_, occurrence_rank


@pytest.mark.parametrize("n,d,b", [(1, 1, 1), (10, 17, 4), (100, 128, 64), (5, 3, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_matches_sequential_loop(n, d, b, dtype, momentum, impl):
    bank = unit(n, d, dtype)
    before = bank.clone()
    idx = torch.randint(0, n, (b,))
    values = unit(b, d)
    ptr = bank.data_ptr()
    if impl == "op":
        out = llp_fast.bank_update_(bank, idx, values, momentum=momentum)
    else:
        out = bank_update_ref_(bank, idx, values.to(dtype), momentum)
    assert out is bank and bank.data_ptr() == ptr
    want = brute_update(before, idx, values.to(dtype), momentum)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    np.testing.assert_allclose(bank.double().numpy(), want, atol=tol, rtol=0)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(bank[untouched], before[untouched])


def test_repeated_indices_apply_in_order():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vals = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    llp_fast.bank_update_(bank, torch.tensor([0, 0, 0]), vals, momentum=0.5)
    m = torch.tensor([1.0, 0.0])
    for v in vals:
        m = torch.nn.functional.normalize(0.5 * m + 0.5 * v, dim=0)
    torch.testing.assert_close(bank[0], m)
    torch.testing.assert_close(bank[1], torch.tensor([0.0, 1.0]))
    # Deterministic: the same call twice gives bit-identical banks.
    a, c = unit(8, 5), None
    c = a.clone()
    idx = torch.tensor([3, 1, 3, 3, 1, 0])
    vals = unit(6, 5)
    llp_fast.bank_update_(a, idx, vals)
    llp_fast.bank_update_(c, idx, vals)
    assert torch.equal(a, c)


def test_occurrence_rank():
    idx = torch.tensor([5, 2, 5, 5, 2, 9])
    assert occurrence_rank(idx).tolist() == [0, 0, 1, 2, 1, 0]
    assert occurrence_rank(torch.empty(0, dtype=torch.long)).tolist() == []


def test_numpy_bank_is_written_in_place():
    bank = unit(6, 4).numpy()
    view = bank
    out = llp_fast.bank_update_(bank, np.array([1, 4]), unit(2, 4).numpy())
    assert out is view
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-6)


def test_empty_batch_is_a_no_op():
    bank = unit(4, 3)
    before = bank.clone()
    llp_fast.bank_update_(bank, torch.empty(0, dtype=torch.long), torch.empty(0, 3))
    assert torch.equal(bank, before)


def test_values_are_cast_to_the_bank_dtype():
    bank = unit(5, 8, torch.bfloat16)
    ref = bank.clone()
    vals = unit(3, 8, torch.float32)
    llp_fast.bank_update_(bank, torch.tensor([0, 2, 4]), vals)
    bank_update_ref_(ref, torch.tensor([0, 2, 4]), vals.bfloat16(), 0.5)
    assert torch.equal(bank, ref)
