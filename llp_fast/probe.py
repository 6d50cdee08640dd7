"""``llp-fast-linear-probe``: transfer by linear readout (paper §4 Table 4, Appendix C).

The trained network is frozen; its pooled features (``PreActResNet.features``, the input of
both heads) are extracted once for another labeled data set, whose images are converted to
the network's own input format (channels, size, normalisation of its training data, see
:mod:`llp_fast.data.extra`). A linear readout is trained on them with SGD (momentum 0.9) from
lr 0.01, dropped x0.1 whenever the validation top-1 has not improved for ``--patience`` epochs
(Appendix C: "dropped by a factor of 10 whenever validation performance saturates", two
drops). The validation split is carved from the probe set's training part (stratified,
seeded); the reported numbers are top-1 and top-5 on its held-out test split, with the
readout of the best validation epoch. With ``--val-fraction 0`` there is no validation split:
the training loss of each epoch's last batch stands in for the validation top-1.

Features are standardised with the training part's mean and standard deviation (an affine
map, so the readout stays linear in the network's features); this makes one learning rate fit
networks whose feature scales differ. ``--no-standardize`` turns it off.

``--solver lbfgs`` fits the readout to convergence instead: multinomial logistic regression on
the whole fit split by L-BFGS (float64), its L2 strength chosen from :data:`LBFGS_L2` by the
validation top-1 (CLIP's linear-probe protocol). The paper's SGD schedule stops once validation
saturates, which on a few hundred validation images comes before the readout converges
(README, "Selecting extra unlabeled data, and transfer by linear probe").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._progress import Progress
from .data import load as load_data
from .data.extra import FilesPool, adapt, native_format, to_input
from .errors import DataError, TrainingDiverged


@torch.no_grad()
def extract(model, net_source, batches, *, pixels: bool = False, progress=None) -> torch.Tensor:
    """Pooled features (N, F) float32 of uint8 image ``batches`` (any size, 1 or 3 channels);
    ``pixels``: the network's input itself, flattened (the no-network control). ``progress(n)``
    is called with each batch's size."""
    fmt = native_format(net_source)
    model.eval()
    feat = (lambda x: x.flatten(1)) if pixels else model.features
    out = []
    for x in batches:
        out.append(feat(to_input(net_source, adapt(x.cpu(), fmt))).float().cpu())
        if progress is not None:
            progress(x.shape[0])
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "feature_dim", 0))


def probe_features(
    model,
    net_source,
    spec: str,
    *,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    pixels: bool = False,
    progress=None,
):
    """``(train_x, train_y, test_x, test_y, num_classes)`` for the labeled data set ``spec``:
    every labeled training example and the held-out split (the data's own, or 20% stratified).
    ``progress``: a :class:`llp_fast._progress.Progress` for the extraction's bar."""
    # (a folder is decoded below by PIL, FilesPool: DALI's loader, built for nothing, refused a GIF)
    loader = "pil" if spec.startswith("folder:") else "auto"
    data = load_data(spec, device="cpu", labeled_fraction=1.0, seed=seed, workers=workers, loader=loader)
    lab = torch.nonzero(data.targets >= 0).flatten()
    ytr, yte = data.targets[lab], data.y_test.cpu()
    if len(yte) == 0:
        raise DataError(f"{spec}: the held-out part has no image to measure the readout on")
    if data.num_classes < 2:
        raise DataError(f"{spec}: one class only; a readout needs at least 2 to tell apart")
    bar = (progress or Progress(enabled=False)).bar(len(lab) + len(yte), "extracting features", "img")
    if hasattr(data, "files"):  # folder: decode the files themselves, in the network's format
        fmt = native_format(net_source)
        tr = FilesPool([data.files[i] for i in lab.tolist()], spec, workers=workers)
        te = FilesPool(list(data.test_files), spec, workers=workers)
        train_batches = (x for x, _ in tr.batches(batch_size, fmt))
        test_batches = (x for x, _ in te.batches(batch_size, fmt))
    else:
        xs, xt, b = data.x.cpu()[lab], data.x_test.cpu(), batch_size
        train_batches = (xs[s : s + b] for s in range(0, xs.shape[0], b))
        test_batches = (xt[s : s + b] for s in range(0, xt.shape[0], b))
    with bar:
        xtr = extract(model, net_source, train_batches, pixels=pixels, progress=bar.update)
        xte = extract(model, net_source, test_batches, pixels=pixels, progress=bar.update)
    return xtr, ytr, xte, yte, data.num_classes


def _split_val(y: torch.Tensor, fraction: float, seed: int):
    """Stratified (fit, val) positions: ``round(fraction * n_c)`` of each class to val, at
    least one where the class has two or more examples; none at all for a fraction of 0."""
    rng = np.random.default_rng(seed)
    y = y.numpy()
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = min(len(members) - 1, max(1, int(round(fraction * len(members))))) if fraction > 0 else 0
        if n > 0:
            val.append(rng.choice(members, n, replace=False))
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    fit = np.setdiff1d(np.arange(len(y)), val)
    return torch.from_numpy(fit), torch.from_numpy(val)


def _topk(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    if y.numel() == 0:
        return float("nan"), float("nan")
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return float((top[:, 0] == y).float().mean()), float((top == y[:, None]).any(1).float().mean())


# L2 strengths --solver lbfgs tries (on the mean cross-entropy: lambda / 2 * |W|^2, the bias free),
# the one of the best validation top-1 kept (ties: the stronger); 1e-3 without a validation split
LBFGS_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
LBFGS_L2_DEFAULT = 1e-3


def _lbfgs_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> torch.nn.Linear:
    """The readout minimising mean cross-entropy + ``l2`` / 2 |W|^2 on ``(x, y)`` (convex: one
    optimum, from zeros), by full-batch L-BFGS in float64 to a gradient of 1e-7."""
    head = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    x = x.double()
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-7, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _lbfgs_readout(xtr, ytr, fit, val, num_classes) -> tuple[torch.nn.Linear, dict]:
    """``--solver lbfgs``: the readout of each strength of :data:`LBFGS_L2` on the fit split, the
    best by validation top-1 (ties: the stronger L2) kept; without a validation split, the one of
    :data:`LBFGS_L2_DEFAULT`."""
    grid = LBFGS_L2 if val.numel() else (LBFGS_L2_DEFAULT,)
    best = None
    for l2 in grid:
        head = _lbfgs_fit(xtr[fit], ytr[fit], num_classes, l2)
        with torch.no_grad():
            v1 = _topk(head(xtr[val].double()), ytr[val])[0] if val.numel() else None
        if best is None or (v1 is not None and v1 > best[1]):
            best = (head, v1, l2)
    head, v1, l2 = best
    return head, {"val_top1": v1, "l2": l2, "best_epoch": None, "epochs_run": None, "lr_drops": None}


def train_readout(
    xtr,
    ytr,
    xte,
    yte,
    num_classes,
    *,
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    batch_size=128,
    epochs=200,
    patience=5,
    drops=2,
    val_fraction=0.1,
    standardize=True,
    seed=0,
    solver="sgd",
) -> dict:
    """Fits the linear readout (see the module docstring; ``solver``: ``sgd``, the paper's
    schedule, or ``lbfgs``, to convergence); returns the metrics dict."""
    if solver not in ("sgd", "lbfgs"):
        raise ValueError(f"solver must be 'sgd' or 'lbfgs', got {solver!r}")
    if xtr.shape[0] < 2:
        raise DataError("the probe data has fewer than 2 labeled training examples")
    gen = torch.Generator().manual_seed(seed)
    fit, val = _split_val(ytr, val_fraction, seed)
    if standardize:
        mu = xtr[fit].mean(0, keepdim=True)
        sd = xtr[fit].std(0, keepdim=True).clamp_min(1e-6)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    if solver == "lbfgs":
        head, info = _lbfgs_readout(xtr, ytr, fit, val, num_classes)
        return _metrics(head, xtr.double(), ytr, xte.double(), yte, fit, val, num_classes, solver, **info)
    with torch.random.fork_rng():  # the readout's initialisation depends on ``seed`` alone
        torch.manual_seed(seed)
        head = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    best, best_state, best_epoch, n_drops, stale = -float("inf"), None, 0, 0, 0
    xf, yf = xtr[fit], ytr[fit]
    epoch = 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(xf.shape[0], generator=gen)
        for s in range(0, xf.shape[0], batch_size):
            i = perm[s : s + batch_size]
            loss = F.cross_entropy(head(xf[i]), yf[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            v1 = _topk(head(xtr[val]), ytr[val])[0] if val.numel() else -float(loss)
            # (diverged weights give NaN logits, whose argmax still scores on the validation split:
            # such an epoch was kept as the best, a chance-level readout reported as a result)
            if not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
                v1 = -float("inf")
        if v1 > best:
            best, best_epoch, stale = v1, epoch, 0
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
        else:
            stale += 1
        # `patience` epochs without a better validation top-1 (since the last drop): x0.1, and after
        # the last drop, once validation saturates again at that rate, stop (it stopped at the last
        # drop itself, never training at the last rate, ReduceLROnPlateau's count one epoch late)
        if stale >= patience:
            if n_drops == drops:
                break
            n_drops, stale = n_drops + 1, 0
            for group in opt.param_groups:
                group["lr"] *= 0.1
    if best_state is None:  # the weights (or, --val-fraction 0, the loss compared) never finite
        raise TrainingDiverged(
            f"the readout's loss was never finite (last {float(loss.detach())}): lower --lr or --weight-decay"
        )
    head.load_state_dict(best_state)
    info = {
        "val_top1": best if val.numel() else None,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "lr_drops": n_drops,
    }
    return _metrics(head, xtr, ytr, xte, yte, fit, val, num_classes, solver, **info)


def _metrics(head, xtr, ytr, xte, yte, fit, val, num_classes, solver, **info) -> dict:
    """The readout's numbers: held-out top-1/top-5, the fit split's top-1, the baselines, and the
    solver's own (``info``: validation top-1, epochs and drops, or the L2 chosen)."""
    with torch.no_grad():
        top1, top5 = _topk(head(xte), yte)
        train1 = _topk(head(xtr[fit]), ytr[fit])[0]
    counts = torch.bincount(ytr, minlength=num_classes)
    return {
        "test_top1": top1,
        "test_top5": top5,
        "val_top1": info.pop("val_top1"),
        "fit_top1": train1,
        "chance_top1": 1.0 / num_classes,
        "majority_top1": float((yte == int(counts.argmax())).float().mean()) if yte.numel() else None,
        "solver": solver,
        **info,
        "num_fit": int(fit.numel()),
        "num_val": int(val.numel()),
        "num_test": int(yte.numel()),
        "num_classes": num_classes,
        "feature_dim": int(xtr.shape[1]),
    }
