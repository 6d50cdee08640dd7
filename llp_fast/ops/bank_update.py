"""``llp_fast.bank_update_``: the in-place memory-bank blend of docs/method.md §1.6."""

from __future__ import annotations

import torch

from .. import _validate as check
from .._interop import array_kind, to_torch
from ..reference import bank_update_ref_
from ._common import compiled_first


@compiled_first("bank_update_")
def _bank_update_default(bank: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, momentum: float) -> None:
    bank_update_ref_(bank, indices, values, momentum)


# The CPU and CUDA kernels come from csrc/ (TORCH_LIBRARY_IMPL); this body serves the rest.
bank_update_op = torch.library.custom_op(
    "llp_fast::bank_update_",
    _bank_update_default,
    mutates_args=("bank",),
    schema="(Tensor(a!) bank, Tensor indices, Tensor values, float momentum) -> ()",
)


@bank_update_op.register_fake
def _(bank, indices, values, momentum):
    return None


def bank_update_(bank, indices, values, *, momentum: float = 0.5, check_finite: bool = True):
    """``bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * v)`` for each
    ``(i, v)`` in ``zip(indices, values)``, in place.

    Args:
        bank: (N, D) contiguous float memory bank (torch, NumPy or CuPy; written in place).
        indices: (B,) integer rows in [0, N).
        values: (B, D) new embeddings, any float dtype (cast to the bank's dtype).
        momentum: mu in [0, 1] (0.5 in the original code).
        check_finite: reject NaN/Inf, or magnitudes whose blend overflows, in ``values`` and
            in the bank rows they update.

    Repeated indices are applied in order of appearance, as the sequential loop over the
    batch would: deterministic, and the same on every backend.

    Returns the ``bank`` object that was passed. On a failed check nothing is written.
    """
    original = bank
    bank = to_torch(bank, "bank", writable=True)
    indices, values = to_torch(indices, "indices"), to_torch(values, "values")
    check.embeddings(bank, "bank", allow_empty=False)
    if not bank.is_contiguous():
        raise ValueError("bank must be contiguous to be updated in place")
    check.writable(bank, "bank", memory=array_kind(original) == "torch")
    check.embeddings(values, "values")
    check.same_space(bank, "bank", values, "values", dtype=False)
    check.vector(indices, "indices", values.shape[0], device=bank.device, kind="int")
    check.in_range(indices, "indices", 0, bank.shape[0], "rows of the bank")
    momentum = check.unit_interval(momentum, "momentum")
    if check_finite:
        check.blend_fits(bank, check.finite(values, "values"), "values")
        if not check.tracing():  # the rows blended (B x D; the rest of the bank is not read)
            check.blend_fits(bank, check.finite(bank[indices.long()], "bank"), "bank")
    if values.shape[0]:
        values = values.detach().to(bank.dtype).contiguous()
        if not check.tracing() and check.shares_memory(values, bank):
            values = values.clone()  # a view of the bank: every row blends the values as passed
        with torch.no_grad():
            bank_update_op(bank, indices.long(), values, momentum)
    return original if array_kind(original) != "torch" else bank
