"""One ``sample_inputs(op)`` per op: arguments of ``torch.ops.llp_fast.<op>.default`` on odd shapes, in
every dtype, on every device here (CUDA when a GPU is visible). They feed each op's correctness tests
against its reference and the float64 brute force (tests/test_<op>.py) and its ``opcheck``
(tests/test_ops.py), so that a new odd shape reaches every test at once (pytorch/extension-cpp's
pattern). Inputs are fresh random draws (conftest seeds each test)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llp_fast.reference import topk_scores_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TAU = 0.07


def devices() -> tuple[str, ...]:
    cuda = torch.cuda.is_available() and os.environ.get("LLP_FAST_NO_CUDA") != "1"
    return ("cpu", "cuda") if cuda else ("cpu",)


@dataclass
class Sample:
    """``op``'s positional arguments ``args`` (its schema's order) and a name for test ids."""

    op: str
    args: tuple
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.args[0].dtype

    @property
    def device(self) -> torch.device:
        return self.args[0].device

    def __repr__(self) -> str:  # pytest ids
        return self.name


def _unit(n: int, d: int, dtype, device) -> torch.Tensor:
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    return x.to(device=device, dtype=dtype)


def _topk_scores(dtype, device):
    # (Q, N, D, k, bias, mask, init): k = N, k > N (padding), D not a multiple of 16, large k,
    # Q = 0, no keys (only the earlier call's init), init merged with an index offset.
    for q, n, d, k, bias, mask, init in [
        (1, 1, 1, 1, True, False, False),
        (1, 7, 5, 7, False, True, False),
        (5, 3, 8, 6, True, True, False),
        (13, 29, 17, 5, True, True, True),
        (20, 300, 8, 200, True, False, True),
        (0, 9, 4, 3, False, False, False),
        (4, 0, 6, 2, False, False, True),
    ]:
        queries, keys = _unit(q, d, dtype, device), _unit(n, d, dtype, device)
        b = (torch.rand(n, dtype=torch.float64) * 2 - 1).float().to(device) if bias else None
        m = (torch.rand(n) < 0.6).to(device) if mask else None
        iv = ii = None
        offset = 0
        if init:
            before = _unit(11, d, dtype, device)
            iv, ii = topk_scores_ref(queries, before, k, TAU)
            iv = iv.to(torch.float64 if dtype == torch.float64 else torch.float32)
            offset = 11
        yield (queries, keys, k, TAU, b, m, iv, ii, offset), f"Q{q}-N{n}-D{d}-k{k}" + "-init" * init


def _propagate(dtype, device):
    # (Q, M, D, k, S, density): K = M, odd D, large K, Q = 0, many classes (the vote's sorted table)
    for q, m, d, k, s, density in [
        (1, 1, 1, 1, 1, True),
        (13, 29, 17, 5, 4, False),
        (37, 101, 19, 33, 7, True),
        (20, 300, 8, 200, 5, True),
        (0, 20, 4, 3, 2, True),
        (16, 33, 128, 33, 1000, True),
    ]:
        queries, labeled = _unit(q, d, dtype, device), _unit(m, d, dtype, device)
        classes = torch.randint(0, s, (m,)).to(device)
        log_rho = (torch.rand(m, dtype=torch.float64) * 3 + 1).to(device, dtype) if density else None
        yield (queries, labeled, classes, log_rho, k, TAU, s), f"Q{q}-M{m}-D{d}-k{k}-S{s}" + "-NoDW" * (not density)


def _local_density(dtype, device):
    # (M, N, D, t, pool fraction): t = N, t = the masked pool, large t
    for m, n, d, t, pool in [
        (1, 1, 1, 1, None),
        (11, 40, 17, 5, 0.6),
        (9, 25, 17, 25, None),
        (30, 97, 33, 25, 0.5),
        (10, 500, 8, 300, None),
    ]:
        labeled, bank = _unit(m, d, dtype, device), _unit(n, d, dtype, device)
        mask = None
        if pool is not None:
            mask = torch.rand(n) < pool
            mask[torch.randperm(n)[:t]] = True  # at least t pool rows
            mask = mask.to(device)
        yield (labeled, bank, t, TAU, mask), f"M{m}-N{n}-D{d}-t{t}" + "-mask" * (pool is not None)


def _aggregation(b, n, d, dtype, device, classes=10):
    """v, bank, bank labels (classes and instance ids, as unvisited unlabeled rows hold), targets
    (each some row's label: positives exist)."""
    v = _unit(b, d, dtype, device)
    bank = _unit(n, d, dtype, device)
    labels = torch.randint(0, classes, (n,))
    labels[: n // 3] = -1 - torch.arange(n // 3)
    targets = labels[torch.randint(0, n, (b,))]
    return v, bank, labels.to(device), targets.to(device)


_AGGREGATION_SHAPES = [(1, 1, 5), (7, 50, 17), (37, 300, 33), (3, 700, 8)]


def _aggregation_loss(dtype, device):
    for b, n, d in _AGGREGATION_SHAPES:
        v, bank, labels, targets = _aggregation(b, n, d, dtype, device)
        yield (v, bank, labels, targets, TAU), f"B{b}-N{n}-D{d}"


def _aggregation_loss_backward(dtype, device):
    from llp_fast.reference import aggregation_loss_ref

    out = torch.float64 if dtype == torch.float64 else torch.float32
    for b, n, d in _AGGREGATION_SHAPES:
        v, bank, labels, targets = _aggregation(b, n, d, dtype, device)
        _, lse_all, lse_pos = aggregation_loss_ref(v, bank, labels, targets, TAU)
        coef = torch.randn(b, dtype=out, device=device)
        args = (v, bank, labels, targets, lse_all.to(out), lse_pos.to(out), coef, -coef, TAU)
        yield args, f"B{b}-N{n}-D{d}"


def _bank_update_(dtype, device):
    # (N, D, B): one row, repeats (B > N), odd D
    for n, d, b in [(1, 1, 1), (10, 17, 4), (5, 3, 12), (100, 128, 64)]:
        bank = _unit(n, d, dtype, device)
        yield (bank, torch.randint(0, n, (b,)).to(device), _unit(b, d, dtype, device), 0.5), f"N{n}-D{d}-B{b}"


def _vote(dtype, device):
    # (rows, K, classes, table size or None, padded): one neighbour, padding, class ids given
    # directly, a table, many rows (several of the CPU kernel's chunks), strided columns
    for r, k, c, m, padded in [
        (1, 1, 1, None, False),
        (13, 7, 3, 40, True),
        (9, 5, 40, None, True),
        (0, 4, 2, 10, False),
        (2100, 130, 10, 700, True),
        (40, 5, 200, 100, True),  # more classes than 4K + 64: the op's sorted path (vote_torch's own)
    ]:
        values = torch.randn(r, k + 2, dtype=torch.float64).sort(dim=1, descending=True).values[:, :k]
        if m is None:
            classes = torch.randint(0, c, (r, k + 2))[:, :k]
        else:
            classes = torch.randint(0, m, (r, k + 2))[:, :k]
        if padded:
            values[::3, -2:] = float("-inf")  # (a row without any neighbour, a NaN confidence that
            # opcheck's comparison does not take as equal: tests/test_propagate.py's vote tests)
            if m is not None:
                classes = classes.masked_fill(values == float("-inf"), -1)
        table = None if m is None else torch.randint(0, c, (m,)).to(device)
        args = (values.to(device, dtype), classes.to(device), table, c)
        yield args, f"r{r}-k{k}-C{c}" + (f"-table{m}" if m else "") + "-pad" * padded


_MAKERS = {
    "topk_scores": _topk_scores,
    "propagate": _propagate,
    "local_density": _local_density,
    "aggregation_loss": _aggregation_loss,
    "aggregation_loss_fused": _aggregation_loss,
    "aggregation_loss_backward": _aggregation_loss_backward,
    "bank_update_": _bank_update_,
    "vote": _vote,
}


def sample_inputs(op: str, *, dtypes=DTYPES, device: str | None = None, diagonal: bool = False) -> list[Sample]:
    """The samples of ``op`` (a name in the op table): every odd shape in each of ``dtypes``, on
    ``device`` (default: every device here); ``diagonal``: each shape once, in the dtypes taken in
    turn (every shape and every dtype met, for the slower checks such as opcheck). Drawn when called:
    call it inside a test (seeded by conftest), and parametrize tests with :func:`sample_ids`."""
    out = []
    for dev in (device,) if device else devices():
        for j, dtype in enumerate(dtypes):
            for i, (args, name) in enumerate(_MAKERS[op](dtype, dev)):
                if not diagonal or i % len(dtypes) == j:
                    out.append(Sample(op, args, f"{dev}-{str(dtype).removeprefix('torch.')}-{name}"))
    return out


def sample_ids(op: str, **kw) -> list[str]:
    """The names of ``op``'s samples (for ``pytest.mark.parametrize``), without drawing tensors."""
    state = torch.random.get_rng_state()
    try:
        return [s.name for s in sample_inputs(op, **kw)]
    finally:
        torch.random.set_rng_state(state)


def sample(op: str, name: str, **kw) -> Sample:
    """The sample of ``op`` called ``name``, freshly drawn."""
    return next(s for s in sample_inputs(op, **kw) if s.name == name)


def out_dtype(sample: Sample) -> torch.dtype:
    """The float dtype of the op's outputs: float64 for float64 inputs, else float32."""
    return torch.float64 if sample.dtype == torch.float64 else torch.float32
