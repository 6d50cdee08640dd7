"""Benchmark of ``aggregation_loss`` forward + backward (docs/method.md §1.3, §4): the fused
bank softmax (Triton on a GPU, the C++ extension on CPU) against materialised logits.

    python bench/bench_aggregation_loss.py          # GPU: B = 256 against up to 1.3M rows; CPU: small, sweep
    python bench/bench_aggregation_loss.py --shapes cpu   # CPU: B = 256 against 25,000 rows
    pytest bench/bench_aggregation_loss.py --benchmark-enable

Providers (each a forward and a backward with respect to v): ``naive`` (materialised (B, N)
logits, two logsumexps, autograd), ``mm_only`` (the two matmuls alone, v @ bank.T and
(B, N) @ bank), ``bank_read`` (one plain read of the bank: the bandwidth floor of
docs/method.md §4), ``reference`` (the chunked reference forward and backward), ``op`` (the
public llp_fast.aggregation_loss with autograd: the fused op on a GPU), ``triton`` (kernels' forward and backward
launchers; GPU only), ``triton_fused`` (the forward that also accumulates the
softmax-weighted bank means, so the backward is elementwise: one bank pass in all; GPU
only), ``extension`` (torch.ops.llp_fast.aggregation_loss and its backward op on the
compiled CPU kernels, csrc/cpu/aggregation_loss_cpu.cpp; CPU only). ``Shape.q`` = B,
``Shape.m`` = N. The peak extra CUDA memory of a call is recorded as ``extra_mb``
(docs/method.md §4: under 16 MB for the fused path).
"""

from __future__ import annotations

import math
import sys

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

import llp_fast
from llp_fast.reference import aggregation_loss_backward_ref, aggregation_loss_grad_from_means, aggregation_loss_ref

OP = "aggregation_loss"
TAU = 0.07
Shape = common.Shape


def shapes(which: str) -> list[Shape]:
    gpu = torch.cuda.is_available()
    small = [Shape("small", 128, 20_000, 128)]
    cpu = [Shape("cpu", 256, 25_000, 128, num_classes=10)]
    step = [Shape("step", 256, 1_281_167), Shape("step-128k", 256, 128_117)]
    if gpu:
        sweep = [Shape("sweep-n", 256, n) for n in (131_072, 262_144, 524_288, 1_048_576)]
        sweep += [Shape("sweep-b", b, 1_281_167) for b in (64, 128, 512, 1024)]
    else:
        sweep = [Shape("sweep-n", 128, n) for n in (10_000, 20_000, 40_000)]
        sweep += [Shape("sweep-b", b, 20_000) for b in (64, 256)]
    table = {"small": small, "cpu": cpu, "step": step, "imagenet": step[:1], "sweep": sweep}
    if which == "auto":
        return step + sweep if gpu else small + sweep
    return common.pick_shapes(table, which)


def make_inputs(shape: Shape, dtype: torch.dtype, dev=None, seed: int = 0):
    """(v, bank, bank_labels, targets): bank labels as in training, 1000 classes on the
    first 10% of the rows and instance ids (-1 - j) elsewhere; targets of the batch drawn
    from the bank's labels so that every row has positives."""
    dev = dev or common.device()
    bank = common.unit_rows(shape.m, shape.d, dtype, dev, seed)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    n_lab = max(1, shape.m // 10)
    bank_labels = -1 - torch.arange(shape.m, device=dev)
    bank_labels[:n_lab] = torch.randint(0, shape.num_classes, (n_lab,), generator=g, device=dev)
    rows = torch.randint(0, shape.m, (shape.q,), generator=g, device=dev)
    v = bank[rows].float().add_(0.1 * torch.randn(shape.q, shape.d, generator=g, device=dev))
    v = torch.nn.functional.normalize(v, dim=1).to(dtype)
    return v, bank, bank_labels, bank_labels[rows].contiguous()


def naive(inputs, shape):
    """Materialised logits: (B, N) float32 scores, masked copy, two logsumexps, autograd."""
    v, bank, bank_labels, targets = inputs
    v = v.detach().requires_grad_(True)
    logits = (v @ bank.T).float() / TAU
    lse_all = torch.logsumexp(logits, dim=1)
    lse_pos = torch.logsumexp(logits.masked_fill(bank_labels[None, :] != targets[:, None], -math.inf), dim=1)
    loss = lse_all - lse_pos
    loss.sum().backward()
    return loss.detach(), v.grad


def mm_only(inputs, shape):
    v, bank = inputs[:2]
    s = v @ bank.T
    return s @ bank


def bank_read(inputs, shape):
    return inputs[1].sum(dim=0, dtype=torch.float32)


def reference(inputs, shape):
    v, bank, bank_labels, targets = inputs
    loss, la, lp = aggregation_loss_ref(v, bank, bank_labels, targets, TAU)
    one = torch.ones_like(loss)
    return loss, aggregation_loss_backward_ref(v, bank, bank_labels, targets, la, lp, one, -one, TAU)


def op(inputs, shape):
    v, bank, bank_labels, targets = inputs
    v = v.detach().requires_grad_(True)
    loss = llp_fast.aggregation_loss(v, bank, bank_labels, targets, tau=TAU, check_finite=False)
    loss.sum().backward()
    return loss.detach(), v.grad


def triton(inputs, shape):
    k = common.triton_kernels()
    v, bank, bank_labels, targets = inputs
    loss, la, lp = k.aggregation_loss_triton(v, bank, bank_labels, targets, TAU)
    one = torch.ones_like(loss)
    return loss, k.aggregation_loss_backward_triton(v, bank, bank_labels, targets, la, lp, one, -one, TAU)


def triton_fused(inputs, shape):
    """The fused forward (one bank pass, flash-attention style) and the elementwise backward."""
    k = common.triton_kernels()
    v, bank, bank_labels, targets = inputs
    loss, _, _, mean_all, mean_pos = k.aggregation_loss_fused_triton(v, bank, bank_labels, targets, TAU)
    one = torch.ones_like(loss)
    return loss, aggregation_loss_grad_from_means(mean_all, mean_pos, one, -one, TAU, v.dtype)


def extension(inputs, shape):
    v, bank, bank_labels, targets = inputs
    loss, la, lp = torch.ops.llp_fast.aggregation_loss.default(v, bank, bank_labels, targets, TAU)
    one = torch.ones_like(loss)
    grad = torch.ops.llp_fast.aggregation_loss_backward.default(v, bank, bank_labels, targets, la, lp, one, -one, TAU)
    return loss, grad


PROVIDERS = {
    "naive": naive,
    "mm_only": mm_only,
    "bank_read": bank_read,
    "reference": reference,
    "op": op,
    "triton": triton,
    "triton_fused": triton_fused,
    "extension": extension,
}


def check_shape() -> Shape:
    gpu = torch.cuda.is_available()
    return Shape("check", 256 if gpu else 64, 100_000 if gpu else 3_000)


def compare(out, ref, dtype, inputs=None, *, shape=None, rounded=False) -> str:
    """Loss (relative to 1 + |loss|) and gradient (relative norm) against the reference: to 1e-4 in
    every dtype (the fused paths multiply bf16 inputs exactly and add in float32, as the reference
    does); 2e-2 for a provider whose logits are rounded to a bf16 or fp16 output (``rounded``)."""
    (loss, grad), (ref_loss, ref_grad) = out, ref
    tol = 2e-2 if rounded else 1e-4
    loss_err = ((loss - ref_loss).abs() / (1 + ref_loss.abs())).max().item()
    grad_err = ((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()).item()
    msg = f"loss error {loss_err:.1e}, relative gradient error {grad_err:.1e}"
    assert loss_err <= tol and grad_err <= tol, msg
    return msg


def flops(s: Shape) -> float:
    return 4.0 * s.q * s.m * s.d  # forward scores + backward (recomputed scores, grad product)


def skip(name: str, s: Shape) -> bool:
    return False


available = common.available


main, test_aggregation_loss = common.entry_points(sys.modules[__name__], gpu_shape=1, memory=True)

if __name__ == "__main__":
    main(sys.argv[1:])
