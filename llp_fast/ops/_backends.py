"""Which implementation serves each op on each device, and why: ``llp_fast.backends()``.

The ops and their implementations are the table of ``llp_fast._op_table``: the C++/CUDA
``extension`` (``csrc/``, loaded by ``llp_fast._ext``), the ``triton`` kernels (``kernels/``, CUDA
only), the pure-PyTorch ``reference`` (``llp_fast.reference``) that every op falls back to, and the
ops computed through ``topk_scores`` (``local_density``, ``propagate``), served by what serves it.
"""

from __future__ import annotations

import torch

from .. import _ext, _optional
from .._op_table import DEVICES, OPS
from ..errors import ConfigError
from . import _common

__all__ = ["OPS", "DEVICES", "backends", "describe_backends"]


def _serving(op: str, device: str) -> tuple[str, str]:
    entry = OPS[op]
    if device == "cuda" and not torch.cuda.is_available():
        return "none", "no CUDA GPU"
    if entry.via is not None:
        impl, why = _serving(entry.via, device)
        return impl, f"{entry.via} + {entry.finish}: {why}"
    if device == "cuda" and entry.triton is not None:
        why = _optional.kernels_unavailable()
        if why is not None:
            return "reference", why
        return "triton", "float32/bfloat16/float16, D <= 256, k <= 1024 (other calls: the reference)"
    if _ext.has_kernel(op, device):
        return "extension", _ext.describe()
    return "reference", _ext.unavailable() or f"the extension has no {device.upper()} kernel for {op}"


def backends(*, last: bool = False) -> dict[str, dict[str, tuple[str, str]]]:
    """Which implementation serves each op on each device, and why.

    Returns ``{op: {device: (implementation, why)}}`` for the ops ``topk_scores``,
    ``local_density``, ``propagate``, ``aggregation_loss``, ``aggregation_loss_backward``,
    ``aggregation_loss_fused`` (what ``aggregation_loss`` runs on CUDA in bf16/fp16 when ``v``
    needs a gradient), ``bank_update_`` and ``vote`` (``propagate``'s finish on CPU with few
    classes, ``llp_fast._topk.vote``) on ``"cpu"`` and ``"cuda"``; the implementation is
    ``"extension"``, ``"triton"``, ``"reference"`` or ``"none"`` (no CUDA GPU). For example
    ``{"topk_scores": {"cpu": ("extension", "llp_fast._C loaded"), "cuda": ("triton", ...)}}``,
    or ``("reference", "LLP_FAST_DISABLE_EXT=1")``, ``("reference", "extension not built:
    <compiler error>")``, ``("reference", "triton not installed")``, ``("reference",
    "LLP_FAST_DISABLE_TRITON=1")``. ``local_density`` and ``propagate`` select with
    ``topk_scores`` and finish in PyTorch: their entry is ``topk_scores``' with the finisher
    named (``("extension", "topk_scores + vote: llp_fast._C loaded")``). Asking loads the
    extension (a JIT build on first use from a source checkout) and, with a GPU, imports the
    Triton kernels, as the first op call would.

    Where Triton serves, each call may still go to the reference: a launcher declines float64
    inputs (``dtype float64``), ``k`` (or ``t``) above 1024 (``k=2000 > 1024``), D above 256
    (``D=300 > 256``), operands of mixed dtypes, and empty key sets. ``last=True`` puts, for
    each (op, device) that has served a call in this process, what served the most recent one
    and why the faster path did not (say ``("reference", "triton declined: k=2000 > 1024")``)
    in place of the general answer. (Once the extension is loaded the dispatcher sends every
    CPU call of its ops straight to it, so there the general answer is each call's.)
    """
    table = {op: {device: _serving(op, device) for device in DEVICES} for op in OPS}
    if last:
        for (op, device), entry in list(_common.LAST_CALL.items()):
            table.setdefault(op, {})[device] = entry
    return table


def describe_backends() -> str:
    """One line for a run's log: per device, which implementation serves which ops and why,
    e.g. ``llp_fast backends: cpu: extension (llp_fast._C loaded) for topk_scores, ... |
    cuda: none (no CUDA GPU) for all ops``, and where the extension serves the CPU, the paths its
    kernels take there (``| cpu kernels: scan avx512; fused float32 tile avx512; ...``)."""
    table = backends()
    parts = []
    for device in DEVICES:
        groups: dict[tuple[str, str], list[str]] = {}
        for op in OPS:  # an op computed through another is listed where that one is
            groups.setdefault(table[OPS[op].via or op][device], []).append(op)
        said = [
            f"{impl} ({why}) for {'all ops' if len(ops) == len(OPS) else ', '.join(ops)}"
            for (impl, why), ops in groups.items()
        ]
        parts.append(f"{device}: " + "; ".join(said))
    if any(table[op]["cpu"][0] == "extension" for op in OPS):
        try:
            paths = _ext.cpu_paths()
        except ValueError as e:  # a LLP_FAST_CPU_* setting that names nothing: one line at a command's start
            raise ConfigError(str(e)) from None
        if paths is not None:
            parts.append(f"cpu kernels: {paths}")
    return "llp_fast backends: " + " | ".join(parts)
