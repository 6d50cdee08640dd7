"""Which implementation serves each op on each device, and why: ``llp_fast.backends()``.

Three implementations can serve an op: the C++/CUDA ``extension`` (``csrc/``, loaded by
``llp_fast._ext``), the ``triton`` kernels (``kernels/``, CUDA only) and the pure-PyTorch
``reference`` (``llp_fast.reference``), which every op falls back to.
"""

from __future__ import annotations

import torch

from .. import _ext, _optional
from . import _common

# Every op, and the Triton launcher of those that have one (on CUDA).
OPS = (
    "propagate",
    "local_density",
    "topk_scores",
    "aggregation_loss",
    "aggregation_loss_backward",
    "aggregation_loss_fused",
    "bank_update_",
)
TRITON_LAUNCHERS = {
    "propagate": "propagate_triton",
    "local_density": "local_density_triton",
    "topk_scores": "topk_scores_triton",
    "aggregation_loss": "aggregation_loss_triton",
    "aggregation_loss_backward": "aggregation_loss_backward_triton",
    "aggregation_loss_fused": "aggregation_loss_fused_triton",
}
DEVICES = ("cpu", "cuda")


def _serving(op: str, device: str) -> tuple[str, str]:
    if device == "cuda" and not torch.cuda.is_available():
        return "none", "no CUDA GPU"
    if device == "cuda" and op in TRITON_LAUNCHERS:
        why = _optional.kernels_unavailable()
        if why is not None:
            return "reference", why
        return "triton", "float32/bfloat16/float16, D <= 256, k <= 64 (other calls: the reference)"
    if _ext.has_kernel(op, device):
        return "extension", _ext.describe()
    return "reference", _ext.unavailable() or f"the extension has no {device.upper()} kernel for {op}"


def backends(*, last: bool = False) -> dict[str, dict[str, tuple[str, str]]]:
    """Which implementation serves each op on each device, and why.

    Returns ``{op: {device: (implementation, why)}}`` for the ops ``propagate``,
    ``local_density``, ``topk_scores``, ``aggregation_loss``, ``aggregation_loss_backward``,
    ``aggregation_loss_fused`` (what ``aggregation_loss`` runs on CUDA in bf16/fp16 when
    ``v`` needs a gradient) and ``bank_update_`` on ``"cpu"`` and ``"cuda"``; the
    implementation is ``"extension"``, ``"triton"``, ``"reference"`` or ``"none"`` (no CUDA
    GPU). For example
    ``{"propagate": {"cpu": ("extension", "llp_fast._C loaded"), "cuda": ("triton", ...)}}``,
    or ``("reference", "LLP_FAST_DISABLE_EXT=1")``, ``("reference", "extension not built:
    <compiler error>")``, ``("reference", "triton not installed")``, ``("reference",
    "LLP_FAST_DISABLE_TRITON=1")``. Asking loads the extension (a JIT build on first use from
    a source checkout) and, with a GPU, imports the Triton kernels, as the first op call would.

    Where Triton serves, each call may still go to the reference: a launcher declines
    float64 inputs (``dtype float64``), ``k`` (or ``t``) above 64 (``k=80 > 64``), D above
    256 (``D=300 > 256``), operands of mixed dtypes, and empty key sets. ``last=True`` puts,
    for each (op, device) that has served a call in this process, what served the most
    recent one and why the faster path did not (say ``("reference", "triton declined: k=80 >
    64")``) in place of the general answer. (Once the extension is loaded the dispatcher
    sends every CPU call of its ops straight to it, so there the general answer is each
    call's.)
    """
    table = {op: {device: _serving(op, device) for device in DEVICES} for op in OPS}
    if last:
        for (op, device), entry in list(_common.LAST_CALL.items()):
            table.setdefault(op, {})[device] = entry
    return table


def describe_backends() -> str:
    """One line for a run's log: per device, which implementation serves which ops and why,
    e.g. ``llp_fast backends: cpu: extension (llp_fast._C loaded) for all ops | cuda: none
    (no CUDA GPU)``."""
    table = backends()
    parts = []
    for device in DEVICES:
        groups: dict[tuple[str, str], list[str]] = {}
        for op in OPS:
            groups.setdefault(table[op][device], []).append(op)
        said = [
            f"{impl} ({why}) for {'all ops' if len(ops) == len(OPS) else ', '.join(ops)}"
            for (impl, why), ops in groups.items()
        ]
        parts.append(f"{device}: " + "; ".join(said))
    return "llp_fast backends: " + " | ".join(parts)
