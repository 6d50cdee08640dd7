"""Shared set-up of the Triton kernel tests (the ``TestTriton`` class of each tests/test_<op>.py).

Without CUDA the kernels run under the Triton interpreter on CPU tensors. triton.jit reads
``TRITON_INTERPRET`` when a kernel is decorated, so it is set here, before anything imports
``llp_fast.kernels``. ``triton_tests`` is the ``pytestmark`` of those classes: the ``triton``
marker, and a skip that says why when the kernels cannot run here (triton missing, an explicit
``TRITON_INTERPRET=0`` without CUDA, or kernels already imported in the other mode).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

from llp_fast.reference import topk_scores_ref  # noqa: E402


def _load_kernels():
    """(llp_fast.kernels, "") when the kernels can run here, else (None, why not)."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    if not (INTERPRET or HAS_CUDA):
        return None, "Triton kernels need CUDA or TRITON_INTERPRET=1"
    from llp_fast import _optional

    k = _optional.kernels()
    if k is None:
        return None, "llp_fast.kernels could not be imported"
    if k._launch.interpreting() != INTERPRET:
        # Something imported the kernels before this module set TRITON_INTERPRET: they were
        # built compiled and cannot run here (or the reverse).
        return None, (
            "llp_fast.kernels was imported before TRITON_INTERPRET was set; run the kernel tests "
            "on their own: TRITON_INTERPRET=1 pytest -m triton"
        )
    return k, ""


kernels, SKIP_REASON = _load_kernels()
triton_tests = [pytest.mark.triton, pytest.mark.skipif(kernels is None, reason=SKIP_REASON or "kernels load")]


def cuda_only(test):
    """Marks a GPU-only test at a realistic shape (compiled kernels, never the interpreter)."""
    skip = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and compiled kernels)")
    return pytest.mark.cuda(skip(test))


# The interpreter runs on CPU tensors; otherwise the small tests run on the GPU.
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
LOW = (torch.bfloat16, torch.float16)


def unit_rows(n: int, d: int, dtype=torch.float32, device=DEVICE, *, gen=None) -> torch.Tensor:
    """``n`` random unit vectors in float64, rounded to ``dtype`` (bank rows are unit norm)."""
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


def clear_rows(queries, labeled, classes, log_rho, k, tau, num_classes, eps=1e-3) -> torch.Tensor:
    """Rows whose label is not a near-tie, judged in float64 on the rounded inputs: a gap of
    at least ``eps`` between the k-th and (k+1)-th scores, and between the two best class
    probabilities. On other rows a correct kernel may legitimately differ by rounding."""
    q, m = queries.double(), labeled.double()
    bias = -log_rho.double() if log_rho is not None else None
    n_k = m.shape[0]
    out = []
    for vals, idx in [topk_scores_ref(q, m, min(k + 1, n_k), tau, bias)]:
        gap = vals[:, k - 1] - vals[:, k] > eps if k < n_k else torch.ones_like(vals[:, 0], dtype=torch.bool)
        v, i = vals[:, :k], idx[:, :k]
        w = torch.exp(v - v[:, :1])
        votes = torch.zeros(v.shape[0], num_classes, dtype=v.dtype, device=v.device)
        votes.scatter_add_(1, classes.long()[i], w)
        p = votes / votes.sum(1, keepdim=True)
        if num_classes > 1:
            top2 = p.topk(2, dim=1).values
            margin = top2[:, 0] - top2[:, 1] > eps
        else:
            margin = torch.ones_like(gap)
        out.append(gap & margin)
    return torch.cat(out)
