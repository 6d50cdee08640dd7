"""Other suspect scores tried against the label gap (docs/embeddings.md, "Suspect labels"): the same
flipped labels and splits as ``bench_suspects.py suspects``, precision among the first n suspects of

- ``plain``: the plain leave-one-out vote (bench_suspects.plain_vote_ranking);
- ``gap``: the label gap alone (llp_fast.embeddings.suspects);
- ``score (default)``: the label gap plus the spreading margin, scaled (llp_fast.embeddings.suspects);
- ``gap K 5+10+20``: the gap summed over K = 5, 10 and 20 (one selection of K = 20 serves all three);
- ``margin``: own class against the best *other* class (the mean z of the K best voters of each);
- ``gap, labeled voters``: the gap over the labeled voters only (the final biases);
- ``gap, rerun``: the rows of the first 10% of the gap's ranking made unlabeled, the run repeated
  (their labels no longer spread to their neighbours), every labeled row scored again;
- ``gap, weight 1``: the gap after a run whose labeled voters count once, not 3 times;
- ``margin, F folds`` (``--folds F``): each labeled row scored by the margin against the final voters
  of a run with its fold's labels removed (F more runs).

The alternatives are computed densely here ((M, voters) score matrices in float64: fine at these
sizes, not the library's streamed pass).

    python bench/bench_suspect_scores.py --seeds 0-4 [--split random] [--folds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_embeddings import default_tag, load, seeds_arg, write_result  # noqa: E402
from bench_suspects import SUSPECT_ROWS, flipped_splits, plain_vote_ranking, precision, ranked  # noqa: E402


def class_support(x, noisy, result, k: int, tau: float, labeled_only: bool = False):
    """(labeled rows, their class indices, (M, C) mean z of each class's k best voters, (M, k) the
    k best z of any class): the row itself left out."""
    lab = np.flatnonzero(noisy >= 0)
    y = np.searchsorted(result.classes, noisy[lab])
    rows, cls, bias = result.voter_rows, result.voter_classes, result.voter_bias
    if labeled_only:
        keep = np.isin(rows, lab)
        rows, cls, bias = rows[keep], cls[keep], bias[keep]
    z = x[lab].astype(np.float64) @ x[rows].astype(np.float64).T / tau - bias[None, :]
    z[lab[:, None] == rows[None, :]] = -np.inf
    support = np.full((len(lab), len(result.classes)), -np.inf)
    for c in range(len(result.classes)):
        zc = -np.sort(-z[:, cls == c], axis=1)
        finite = np.isfinite(zc)
        take = finite & (np.cumsum(finite, axis=1) <= k)
        support[:, c] = np.where(take.any(1), np.where(take, zc, 0).sum(1) / np.maximum(take.sum(1), 1), -np.inf)
    return lab, y, support, -np.sort(-z, axis=1)[:, :k]


def gap(x, noisy, result, k: int, tau: float, labeled_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    lab, y, support, best = class_support(x, noisy, result, k, tau, labeled_only)
    return lab, np.minimum(support[np.arange(len(lab)), y] - best.mean(1), 0.0)


def margin(x, noisy, result, k: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    lab, y, support, _ = class_support(x, noisy, result, k, tau)
    own = support[np.arange(len(lab)), y].copy()
    support[np.arange(len(lab)), y] = -np.inf
    return lab, own - support.max(1)


def scores(x, noisy, folds: int) -> dict[str, np.ndarray]:
    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.suspects import drop_worst, suspects_of

    s = Settings()
    run = label_embeddings(x, noisy, s, normalize=False)
    found = suspects_of(Rows(x, normalize=False), noisy, run, s)
    out = {"plain": plain_vote_ranking(x, noisy), "gap": ranked(found.labeled, found.gap)}
    out["score (default)"] = found.rows
    total = sum(gap(x, noisy, run, k, s.tau)[1] for k in (5, 10, 20))
    out["gap K 5+10+20"] = ranked(np.flatnonzero(noisy >= 0), total)
    out["margin"] = ranked(*margin(x, noisy, run, 10, s.tau))
    out["gap, labeled voters"] = ranked(*gap(x, noisy, run, 10, s.tau, labeled_only=True))
    rerun = label_embeddings(x, drop_worst(noisy, found, 0.1)[0], s, normalize=False)
    out["gap, rerun"] = ranked(*gap(x, noisy, rerun, 10, s.tau))
    once = Settings(labeled_weight=1.0)
    out["gap, weight 1"] = ranked(*gap(x, noisy, label_embeddings(x, noisy, once, normalize=False), 10, s.tau))
    if folds:
        lab = np.flatnonzero(noisy >= 0)
        fold = np.random.default_rng(0).permutation(len(lab)) % folds
        held = np.empty(len(lab))
        for f in range(folds):
            out_rows = lab[fold == f]
            train = noisy.copy()
            train[out_rows] = -1
            scored = np.where(np.isin(np.arange(len(noisy)), out_rows), noisy, -1)
            held[fold == f] = margin(x, scored, label_embeddings(x, train, s, normalize=False), 10, s.tau)[1]
        out[f"margin, {folds} folds"] = ranked(lab, held)
    return out


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=seeds_arg, default="0-4", help="N, A-B or a comma list of those")
    ap.add_argument("--split", choices=("balanced", "random"), default="balanced")
    ap.add_argument("--folds", type=int, default=0)
    ap.add_argument("--tag", default=None, help="the results file's tag (default: the host name and CPU kind)")
    args = ap.parse_args(argv)
    args.tag = args.tag or default_tag()
    torch.set_num_threads(1)
    rows = {}
    t0 = time.perf_counter()
    for name, frac in SUSPECT_ROWS:
        x, y = load(name)
        row = rows.setdefault(f"{name} {int(frac * 100)}%", {})
        for noisy, flipped in flipped_splits(y, frac, args.seeds, args.split):
            for title, ranking in scores(x, noisy, args.folds).items():
                row.setdefault(title, []).append(precision(ranking, flipped))
        print(f"{name} {int(frac * 100)}%: " + ", ".join(f"{m} {np.mean(v):.3f}" for m, v in row.items()), flush=True)
    methods = list(next(iter(rows.values())))
    print(f"\n{args.split} {args.seeds}\n| features, labels | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean(row[m]):.3f}" for m in methods) + " |")
    result = {"seeds": args.seeds, "split": args.split, "folds": args.folds, "rows": rows,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    write_result(result, f"suspects_scores-{args.split}{args.seeds}-{args.tag}.json")


if __name__ == "__main__":
    main()
