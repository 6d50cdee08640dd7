"""``llp-fast-analyze RUN_DIR``: pictures of a training run (PNG, matplotlib) and an index.html.

From ``RUN_DIR/metrics.jsonl`` (one JSON object per epoch) and ``RUN_DIR/checkpoint.pt``
(the last checkpoint, whose ``bank`` entry is a :class:`llp_fast.MemoryBank` state):

* ``curves.png`` — held-out top-1 (and kNN top-1), pseudo-label accuracy and the
  aggregation metric per epoch;
* ``density.png`` — the paper's Fig. 3a/b: per class, D_i (mean local density of its
  labeled points) against Q_i (unlabeled examples pseudo-labeled i), one panel per run
  (``--compare RUN_DIR2`` puts e.g. a NoDW run beside LLP); ``q_hist.png`` — Fig. 3c, the
  histogram of Q_i; ``corr.png`` — Fig. 3d, Pearson corr(D_i, Q_i) over training;
* ``embedding_map.png`` — Fig. 2a: a 2-D map (PCA, or MDS with ``--map mds``) of the bank
  embeddings of a few classes, labeled points marked; ``aggregation_hist.png`` — Fig. 2c,
  the histogram of the per-class aggregation (norm of the class-mean embedding).

D_i in ``density.png`` is recomputed from the final bank with :func:`llp_fast.local_density`
(the unlabeled pool, the run's T and tau; the mean density, not its log), so it is comparable
between an LLP and a NoDW run, which stores no densities. ``corr.png`` plots the run's own
``corr_density_count`` (metrics.jsonl): the mean of each class's stored log-densities, those the
epoch's votes used (the run's pool), against Q_i. The two are different measures of the same
relation and their r can differ, in sign too; both figures say which is shown. The page that
links the pictures is :mod:`llp_fast.analysis_page`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import _files, _optional
from ._files import WriteError, atomic_open
from .analysis_page import is_analysis, write_index
from .bank import MemoryBank
from .errors import AnalyzeError, ConfigError, UserError
from .ops import local_density
from .train import checkpoint
from .train.checkpoint import CHECKPOINT, CONFIG, METRICS
from .train.report import read_metrics


# -- reading a run ---------------------------------------------------------------------------
def read_run(run_dir: str | os.PathLike) -> dict:
    """{'name', 'metrics': [dict per epoch], 'bank': state dict or None, 'config': dict}."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise AnalyzeError(f"{run} is a file: give the run directory that holds it")
    if not run.is_dir():
        raise AnalyzeError(f"run directory {run} does not exist")
    metrics_path = run / METRICS
    if not metrics_path.exists() and (run / CONFIG).exists():  # (a run that has not finished an epoch yet)
        raise AnalyzeError(f"{run}: the run has not finished an epoch yet (no {METRICS}): analyse it after its first")
    if not metrics_path.exists():
        raise AnalyzeError(f"{metrics_path} not found: is {run} a llp-fast-train run directory?")
    rows = read_metrics(str(metrics_path))
    if not rows:
        raise AnalyzeError(f"{metrics_path} holds no epoch yet")
    for n, row in enumerate(rows, 1):  # (a row without its epoch was a KeyError traceback)
        if isinstance(row.get("epoch"), bool) or not isinstance(row.get("epoch"), int):
            raise AnalyzeError(f"{metrics_path}: row {n} has no whole-number 'epoch' (not a run's metrics)")
    bank, config, saved, steps = None, {}, None, 0
    ckpt_path = run / CHECKPOINT
    if ckpt_path.exists():
        ckpt = checkpoint.load(str(ckpt_path), need=("config", "bank", "targets"))  # verified
        config = ckpt["config"]
        saved = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
        steps = ckpt.get("step_in_epoch") if isinstance(ckpt.get("step_in_epoch"), int) else 0  # (a signal's)
        if ckpt["bank"] is not None:
            bank = _bank_state(ckpt, str(run))
    # (the folder's own name: "." and ".." named the run "" and "..")
    return {
        "name": run.resolve().name or str(run),
        "metrics": rows,
        "bank": bank,
        "config": config,
        "saved": saved,
        "steps": steps,
    }


def _bank_state(ckpt: dict, run_dir: str) -> dict:
    """The checkpoint's bank as one :meth:`MemoryBank.state_dict` (bank order), whatever the
    world size that wrote it."""
    targets = ckpt["targets"]
    pieces = checkpoint.bank_pieces(ckpt["bank"], run_dir)
    bank = MemoryBank(targets, int(targets.max()) + 1, dim=pieces[0]["embeddings"].shape[1])
    bank.load_rows(pieces)
    return bank.state_dict()


def class_density_and_counts(bank: dict, *, t: int, tau: float):
    """(D (S,), Q (S,)): mean density exp(log_rho) of each class's labeled rows, and the
    number of unlabeled rows whose stored label is that class. Classes without a labeled
    row get D = nan."""
    emb, labels = bank["embeddings"].float(), bank["labels"].long()
    m, s = int(bank["num_labeled"]), int(bank["num_classes"])
    pool = emb[m:]
    log_rho = local_density(emb[:m], pool, t=min(t, pool.shape[0]), tau=tau).double()
    rho = torch.exp(log_rho - log_rho.max())  # Z * rho: a common scale does not change the picture
    cls = labels[:m]
    d = torch.full((s,), float("nan"), dtype=torch.float64)
    for c in range(s):
        if bool((cls == c).any()):
            d[c] = rho[cls == c].mean()
    unl = labels[m:]
    q = torch.bincount(unl[unl >= 0], minlength=s)[:s]
    return d.numpy(), q.numpy()


def _series(rows, key):
    xs, ys = [], []
    for r in rows:
        if r.get(key) is not None:
            xs.append(r["epoch"])
            ys.append(r[key])
    return xs, ys


# -- figures ---------------------------------------------------------------------------------
def _save(fig, path) -> None:
    """The figure as a PNG at ``path``, written atomically (a full disk is one line naming it)."""
    with atomic_open(str(path)) as f:
        fig.savefig(f, format="png", dpi=110)


def _shown(name: str) -> str:
    """A run's name as matplotlib draws it: ``$`` literal (it was math notation, or a traceback) and
    a leading ``_`` shown (matplotlib leaves such a label out of the legend)."""
    name = name.replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def _plt():
    matplotlib = _optional.need("matplotlib", "analyze", "llp-fast-analyze's pictures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        for ax, keys in zip(axes, (("test_top1", "knn_top1"), ("pseudo_acc",), ("aggregation",))):
            for key in keys:
                xs, ys = _series(run["metrics"], key)
                if xs:
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        ms=3,
                        label=f"{_shown(run['name'])}: {key}",
                        ls="-" if key != "knn_top1" else "--",
                    )
    for ax, title in zip(axes, ("held-out top-1 (classifier) and kNN top-1", "pseudo-label accuracy", "aggregation")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_density(runs, dq, path_scatter, path_hist):
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        d, q = dq[run["name"]]
        ok = np.isfinite(d)
        r = np.corrcoef(d[ok], q[ok])[0, 1] if ok.sum() > 2 and d[ok].std() > 0 and q[ok].std() > 0 else float("nan")
        ax.scatter(d[ok], q[ok], s=18, alpha=0.8)
        ax.set_xlabel("D_i: mean density of class i's labeled points\n(the final bank, over the unlabeled pool)")
        ax.set_ylabel("Q_i: unlabeled examples pseudo-labeled i")
        ax.set_title(f"{_shown(run['name'])}  (Pearson r = {r:.2f})", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path_scatter)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    top = max(int(dq[run["name"]][1].max()) for run in runs) + 1
    bins = np.linspace(0, top, 16)
    for run in runs:
        ax.hist(dq[run["name"]][1], bins=bins, alpha=0.55, label=_shown(run["name"]))
    ax.set_xlabel("Q_i (pseudo-labeled examples per class)")
    ax.set_ylabel("classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path_hist)
    plt.close(fig)


def plot_corr(runs, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for run in runs:
        xs, ys = _series(run["metrics"], "corr_density_count")
        ax.plot(xs, ys, marker="o", ms=3, label=_shown(run["name"]))
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("corr(mean log-density, Q_i)")
    ax.set_title("each epoch's own densities (metrics.jsonl) against Q_i", fontsize=10)
    if ax.has_data():
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def embedding_map(bank: dict, classes, *, method: str = "pca", per_class: int = 150, seed: int = 0):
    """2-D coordinates of up to ``per_class`` bank rows of each class in ``classes`` (by
    stored label), and which of them are labeled. Returns (xy, labels, is_labeled)."""
    emb, labels = bank["embeddings"].float(), bank["labels"].long()
    m = int(bank["num_labeled"])
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:
        rows = torch.nonzero(labels == c).flatten()
        picked.append(rows[torch.randperm(rows.shape[0], generator=g)[:per_class]])
    rows = torch.cat(picked)
    x = emb[rows].double().numpy()
    if method == "mds":
        MDS = _optional.need("sklearn.manifold", "analyze", "--map mds").MDS
        xy = MDS(n_components=2, random_state=seed, n_init=1, init="random").fit_transform(x)
    else:
        x = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
    return xy, labels[rows].numpy(), (rows < m).numpy()


def plot_embedding_map(bank, path, *, n_classes: int = 4, method: str = "pca") -> int:
    """The 2-D map of the bank's ``n_classes`` most populous classes (fewer where the run has fewer);
    returns how many it drew."""
    plt = _plt()
    labels = bank["labels"].long()
    present = torch.bincount(labels[labels >= 0])
    classes = torch.argsort(present, descending=True)[:n_classes].tolist()
    xy, lab, is_lab = embedding_map(bank, classes, method=method)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    colors = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")  # (MAX_MAP_CLASSES: one colour a class)
    for n, c in enumerate(classes):
        sel = (lab == c) & ~is_lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.5, color=colors(n), label=f"class {c}")
        sel = (lab == c) & is_lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=70, marker="*", color=colors(n), edgecolors="black", linewidths=0.6)
    ax.set_title(f"bank embeddings ({method.upper()}); stars: labeled points", fontsize=10)
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return len(classes)


def plot_aggregation_hist(runs, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for run in runs:
        per_class = [r.get("aggregation_per_class") for r in run["metrics"] if r.get("aggregation_per_class")]
        if per_class:
            ax.hist(per_class[-1], bins=12, alpha=0.55, label=_shown(run["name"]))
    ax.set_xlabel("aggregation: norm of the class-mean embedding")
    ax.set_ylabel("classes")
    if ax.has_data():
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def analyze(run_dir, *, compare=None, out=None, method: str = "pca", n_classes: int = 4) -> list[Path]:
    """Writes the pictures and index.html; returns the written paths."""
    runs = [read_run(run_dir)]
    if compare:
        try:
            runs.append(read_run(compare))
        except UserError as e:  # which of the two runs it is (the message names only its path)
            raise type(e)(f"--compare: {e}") from None
    if len(runs) == 2 and runs[0]["name"] == runs[1]["name"]:
        runs[1]["name"] += " (compare)"
    if not 1 <= n_classes <= MAX_MAP_CLASSES:  # (200 drew ten colours over 200 classes, a legend cut at 25)
        raise ConfigError(f"--classes must lie in 1..{MAX_MAP_CLASSES} (one colour a class), got {n_classes}")
    final = Path(out) if out else Path(run_dir) / "analysis"
    if why := _files.parent_problem(final):
        raise AnalyzeError(f"--out {final}: {why}")
    if final.exists() and not final.is_dir():
        raise AnalyzeError(f"--out {final}: exists and is not a directory")
    # A folder of the user's: its pictures of these names were overwritten, and those this run does
    # not draw removed, without a word. Only an earlier analysis (its page says so) is replaced.
    earlier = is_analysis(final)
    taken = [n for n in ("index.html", *FIGURES) if (final / n).exists()] if not earlier else []
    if taken:
        name = f"{taken[0]}, which is not from an earlier llp-fast-analyze page"
        raise AnalyzeError(f"--out {final}: it holds {name}; give another folder (nothing was written)")
    # Everything is drawn into a temporary folder beside the output and moved into it at the end: an
    # error or an interrupt leaves the output as it was (the CLI says "nothing was written").
    # A failure names the output the user asked for, never the temporary folder.
    with _files.temp_folder(str(final)) as tmp:  # (a killed run's is swept: _files.temp_folder)
        out = Path(tmp)
        try:
            figures, index = _draw(runs, out, method, n_classes)
        except WriteError as e:  # a picture of the temporary folder: the same name in --out
            raise WriteError(str(final / Path(e.filename).name), OSError(e.errno, e.strerror), what=e.what) from e
        names = [f for f, _ in figures] + [index.name]
        try:
            final.mkdir(exist_ok=True)
        except OSError as e:
            raise WriteError(str(final), e) from e
        for name in names:
            try:
                os.replace(out / name, final / name)
            except OSError as e:
                raise WriteError(str(final / name), e) from e
        for name in set(FIGURES) - set(names) if earlier else ():  # an earlier analysis's, not drawn again
            try:
                os.remove(final / name)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise WriteError(str(final / name), e) from e
    return [final / name for name in names]


# Every picture an analysis may draw (the index page links those of this run): in an --out that
# already held another run's analysis, the ones not drawn again are removed.
FIGURES = ("curves.png", "corr.png", "density.png", "q_hist.png", "embedding_map.png", "aggregation_hist.png")
MAX_MAP_CLASSES = 20  # the embedding map's classes: one colour each (tab20)


def _draw(runs, out: Path, method: str, n_classes: int):
    """The figures (file, caption) drawn into ``out`` and the index page's path."""
    figures = []
    plot_curves(runs, out / "curves.png")
    figures.append(("curves.png", "learning curves"))
    if any(_series(r["metrics"], "corr_density_count")[0] for r in runs):
        plot_corr(runs, out / "corr.png")
        figures.append(("corr.png", "corr(D_i, Q_i) over training (Fig. 3d)"))
    with_bank = [r for r in runs if r["bank"] is not None]
    if with_bank:
        dq = {}
        for r in with_bank:
            t = int(r["config"].get("t", 25))
            tau = float(r["config"].get("tau", 0.07))
            dq[r["name"]] = class_density_and_counts(r["bank"], t=t, tau=tau)
        plot_density(with_bank, dq, out / "density.png", out / "q_hist.png")
        figures += [
            ("density.png", "D_i against Q_i per class (Fig. 3a/b)"),
            ("q_hist.png", "histogram of Q_i (Fig. 3c)"),
        ]
        drawn = plot_embedding_map(with_bank[0]["bank"], out / "embedding_map.png", n_classes=n_classes, method=method)
        what = f"the {drawn} most populous classes" if drawn > 1 else "the most populous class"
        figures.append(("embedding_map.png", f"embedding map of {what}, {with_bank[0]['name']}'s bank (Fig. 2a)"))
    if any(r.get("aggregation_per_class") for run in runs for r in run["metrics"]):
        plot_aggregation_hist(runs, out / "aggregation_hist.png")
        figures.append(("aggregation_hist.png", "per-class aggregation (Fig. 2c)"))
    return figures, write_index(out, figures, runs)
