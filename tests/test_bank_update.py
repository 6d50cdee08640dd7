"""llp_fast.bank_update_ (docs/method.md §1.6): the in-place blend against the sequential loop,
and the C++/CUDA extension's kernels (``TestExtension``) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ext_setup import require_ext
from brute import bank_update as brute_update
from conftest import unit

import llp_fast
from llp_fast.reference import bank_update_ref_, occurrence_rank

# Native kernels run on odd shapes here: a crash fails this module's tests, not the whole run.
pytestmark = pytest.mark.isolated


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


# ---------------------------------------------------------------------------------------------
# The compiled kernels (csrc/cpu/bank_update_cpu.cpp, csrc/cuda/bank_update_cuda.cu) against
# reference.bank_update_ref_: same rows written, repeated indices in order of appearance, truly in
# place, untouched rows untouched.
#
# Accuracy: the kernels do the reference's arithmetic op for op except the squared norm's summation
# order (ATen's vectorised reduction order depends on the CPU's vector width, so it is not copied).
# One update is therefore within 2 ulps of the reference (most elements bit-identical); a chain of
# updates of one row can amplify that (cancellation in the blend), so chains are checked the way
# low-precision paths are: error against a float64 truth no worse than 2x the reference's own error.

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between same-dtype tensors (same sign assumed
    wherever values differ, which holds for nearby values away from zero)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    ia = a.contiguous().view(_INT_VIEW[a.dtype]).long()
    ib = b.contiguous().view(_INT_VIEW[b.dtype]).long()
    return int((ia - ib).abs().max())


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


OP = torch.ops.llp_fast.bank_update_.default


def _bank(n, d, dtype, device="cpu"):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype).to(device)


_EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _truth(bank, indices, values, momentum):
    """The sequential loop of docs/method.md §1.6 in float64, rounding the row to the bank dtype after each
    occurrence as the op's contract does (the stored row is what the next occurrence blends)."""
    out = bank.double().clone()
    for i, v in zip(indices.tolist(), values.double()):
        row = momentum * out[i] + (1 - momentum) * v
        out[i] = (row / row.norm().clamp_min(1e-12)).to(bank.dtype).double()
    return out


def _assert_as_accurate(ours, ref, bank, indices, values, momentum):
    truth = _truth(bank, indices, values.to(bank.dtype), momentum).to(ours.device)
    err_ours = (ours.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_ref + 4 * _EPS[bank.dtype], (err_ours, err_ref)


def _run_both(bank, indices, values, momentum, device="cpu"):
    """(kernel result, reference result) on copies of ``bank``, and the kernel's bank object."""
    ours = bank.clone()
    ref = bank.clone()
    ptr = ours.data_ptr()
    OP(ours, indices, values.to(bank.dtype).contiguous(), momentum)
    assert ours.data_ptr() == ptr  # written in place, no reallocation
    bank_update_ref_(ref, indices, values.to(bank.dtype), momentum)
    return ours, ref


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class TestExtension:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(100, 128), (7, 17), (1, 1), (300, 3)])
    def test_matches_reference(self, dtype, shape):
        require_ext("bank_update_")
        n, d = shape
        bank = _bank(n, d, dtype)
        b = min(n, 64)
        indices = torch.randperm(n)[:b]
        values = torch.randn(b, d, dtype=dtype)
        ours, ref = _run_both(bank, indices, values, 0.5)
        assert ulp_diff(ours, ref) <= (2 if dtype in (torch.float32, torch.float64) else 1)
        _assert_as_accurate(ours, ref, bank, indices, values, 0.5)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_repeated_indices_in_order_of_appearance(self, dtype):
        require_ext("bank_update_")
        n, d = 50, 33
        bank = _bank(n, d, dtype)
        indices = torch.tensor([3, 5, 3, 3, 7, 5, 49, 0, 3, 49])
        values = torch.randn(len(indices), d, dtype=dtype)
        ours, ref = _run_both(bank, indices, values, 0.3)
        _assert_as_accurate(ours, ref, bank, indices, values, 0.3)
        # The rule itself, spelled as the sequential loop the reference documents (float64: exact).
        if dtype == torch.float64:
            loop = bank.clone()
            for i, v in zip(indices.tolist(), values):
                loop[i] = F.normalize(0.3 * loop[i] + 0.7 * v, dim=0)
            torch.testing.assert_close(ours, loop, rtol=1e-14, atol=1e-15)

    def test_many_repeats_large_batch(self):
        require_ext("bank_update_")
        bank = _bank(40, 128, torch.float32)
        indices = torch.randint(0, 40, (256,))  # B = 256 over 40 rows: every row repeats
        values = torch.randn(256, 128)
        ours, ref = _run_both(bank, indices, values, 0.5)
        _assert_as_accurate(ours, ref, bank, indices, values, 0.5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_in_place_and_untouched_rows(self, dtype):
        require_ext("bank_update_")
        bank = _bank(200, 64, dtype)
        before = bank.clone()
        indices = torch.tensor([10, 199, 0, 10])
        values = torch.randn(4, 64, dtype=dtype)
        ptr, version = bank.data_ptr(), bank._version
        out = llp_fast.bank_update_(bank, indices, values, momentum=0.5)
        assert out is bank and bank.data_ptr() == ptr
        assert bank._version > version  # autograd sees the mutation
        touched = torch.zeros(200, dtype=torch.bool)
        touched[indices] = True
        assert torch.equal(
            bank[~touched].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            before[~touched].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        )
        assert not torch.equal(bank[touched], before[touched])
        torch.testing.assert_close(bank[touched].float().norm(dim=1), torch.ones(3), rtol=1e-2, atol=1e-2)

    @pytest.mark.parametrize("momentum", [0.0, 1.0, 0.9])
    def test_momentum_edges(self, momentum):
        require_ext("bank_update_")
        bank = _bank(20, 16, torch.float32)
        indices = torch.tensor([1, 2, 1])
        values = torch.randn(3, 16)
        ours, ref = _run_both(bank, indices, values, momentum)
        _assert_as_accurate(ours, ref, bank, indices, values, momentum)

    def test_zero_blend_uses_eps(self):
        # mu * m + (1 - mu) * v == 0: F.normalize divides by eps = 1e-12 and gives zeros, not NaN.
        require_ext("bank_update_")
        bank = torch.ones(3, 4)
        ours, ref = _run_both(bank, torch.tensor([1]), -torch.ones(1, 4), 0.5)
        assert torch.equal(ours, ref) and torch.isfinite(ours).all()

    def test_empty_batch_is_a_no_op(self):
        require_ext("bank_update_")
        bank = _bank(5, 8, torch.float32)
        before = bank.clone()
        OP(bank, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 8), 0.5)
        assert torch.equal(bank, before)

    def test_public_function_dispatches_to_kernel(self):
        require_ext("bank_update_")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("llp_fast::bank_update_", "CPU")
        bank = _bank(30, 8, torch.float32)
        before = bank.clone()
        ref = bank.clone()
        idx = torch.tensor([4, 4, 9])
        vals = torch.randn(3, 8)
        llp_fast.bank_update_(bank, idx, vals)
        bank_update_ref_(ref, idx, vals, 0.5)
        _assert_as_accurate(bank, ref, before, idx, vals, 0.5)

    # CUDA: run on the GPU machine (pytest -m cuda); skipped here.
    @pytest.mark.cuda
    @needs_gpu
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_cuda_matches_reference(self, dtype):
        require_ext("bank_update_", device="cuda")
        bank = _bank(1000, 128, dtype, "cuda")
        indices = torch.cat([torch.randperm(1000)[:200], torch.randint(0, 1000, (56,))]).cuda()  # repeats too
        values = torch.randn(256, 128, dtype=dtype, device="cuda")
        ours, ref = _run_both(bank, indices, values, 0.5)
        _assert_as_accurate(ours, ref, bank, indices, values, 0.5)
        # and the CPU kernel agrees
        cpu = bank.cpu()
        OP(cpu, indices.cpu(), values.cpu(), 0.5)
        _assert_as_accurate(ours.cpu(), cpu, bank.cpu(), indices.cpu(), values.cpu(), 0.5)

    @pytest.mark.cuda
    @needs_gpu
    def test_cuda_repeats_and_untouched_rows(self):
        require_ext("bank_update_", device="cuda")
        bank = _bank(64, 130, torch.float32, "cuda")
        before = bank.clone()
        indices = torch.tensor([5, 9, 5, 5, 63, 9, 0], device="cuda")
        values = torch.randn(7, 130, device="cuda")
        ptr = bank.data_ptr()
        ref = bank.clone()
        OP(bank, indices, values, 0.25)
        bank_update_ref_(ref, indices, values, 0.25)
        assert bank.data_ptr() == ptr
        _assert_as_accurate(bank, ref, before, indices, values, 0.25)
        untouched = torch.ones(64, dtype=torch.bool, device="cuda")
        untouched[indices] = False
        assert torch.equal(bank[untouched], before[untouched])

    @pytest.mark.cuda
    @needs_gpu
    def test_cuda_one_kernel_launch(self):
        require_ext("bank_update_", device="cuda")
        bank = _bank(10000, 128, torch.float32, "cuda")
        indices = torch.randint(0, 10000, (256,), device="cuda")
        values = torch.randn(256, 128, device="cuda")
        OP(bank, indices, values, 0.5)  # warm up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            OP(bank, indices, values, 0.5)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names = {e.name for e in kernels}
        assert len(kernels) == 1 and any("bank_update_kernel" in n for n in names), names
