"""Which ops exist and which implementations each has: the one table that ``llp_fast.backends()``,
the extension loader (``llp_fast._ext``) and the kernel registrations (``llp_fast/ops``) read.
``csrc/bindings.cpp`` and ``kernels/__init__.py`` are checked against it (tests/test_backends.py).

Every op's default body is its pure-PyTorch reference (``llp_fast.reference``). Beside it an op has
a C++/CUDA kernel from the compiled extension on some devices (``extension``), a Triton launcher for
CUDA (``triton``, in ``llp_fast.kernels``), or is computed through another op (``via``): the top-K
selection of ``topk_scores``, then a finisher of ``llp_fast._topk`` (docs/method.md §1.1, §1.2).
One finisher is itself an op: ``vote``, whose default body is ``_topk.vote_torch`` and which the
extension serves on CPU (where it sums in a (rows, classes) table).
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Op:
    extension: tuple[str, ...] = ()  # devices on which csrc/ registers a kernel
    triton: str | None = None  # the CUDA launcher's name in llp_fast.kernels
    via: str | None = None  # the op whose selection this op finishes
    finish: str | None = None  # the finisher (a function of llp_fast._topk)


OPS: dict[str, Op] = {
    "topk_scores": Op(extension=("cpu",), triton="topk_scores_triton"),
    "local_density": Op(via="topk_scores", finish="log_sum_exp"),
    "propagate": Op(via="topk_scores", finish="vote"),
    "aggregation_loss": Op(extension=("cpu",), triton="aggregation_loss_triton"),
    "aggregation_loss_backward": Op(extension=("cpu",), triton="aggregation_loss_backward_triton"),
    "aggregation_loss_fused": Op(triton="aggregation_loss_fused_triton"),
    "bank_update_": Op(extension=("cpu", "cuda")),
    "vote": Op(extension=("cpu",)),
}


def extension_ops(device: str) -> tuple[str, ...]:
    """The ops for which the compiled extension registers a kernel on ``device`` ("cpu", "cuda")."""
    return tuple(name for name, op in OPS.items() if device in op.extension)


def triton_launchers() -> dict[str, str]:
    """{op: launcher name} of the ops with a Triton kernel (CUDA)."""
    return {name: op.triton for name, op in OPS.items() if op.triton is not None}
