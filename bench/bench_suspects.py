"""What the labeller adds to a kNN vote (docs/embeddings.md): suspect labels, K and tau from the data,
and a saved model labelling new rows.

    python bench/bench_suspects.py suspects [--seeds 0-4] [--split balanced|random] [--tau 0.07]
    python bench/bench_suspects.py false-alarms [--seeds 0-39]  # digits: which rows, and does an SVM agree
    python bench/bench_suspects.py auto [--seeds 0-4] [--noise 0.2]  # the README's accuracy rows
    python bench/bench_suspects.py drop [--seeds 0-4] [--split random] [--noise 0.2]  # --drop-suspects
    python bench/bench_suspects.py model [--n 1000000] [--train 200000]
    python bench/bench_suspects.py cost [--n 200000] [--labeled 0.01] [--threads 2]
    python bench/bench_suspects.py ceiling [--seeds 0-39] [--split random]  # what better pseudo-labels would find

``suspects``: 10% of the labeled rows flipped to another class at random; precision among the first
n suspects (n = the number flipped) of the plain leave-one-out vote (each labeled row voted on by
its 10 nearest other labeled rows, weight exp(s / tau), ranked by its own label's share) and of
the suspect score (llp_fast.embeddings.suspects: label gap + spreading margin, scaled by the row's
nearest-voter distance, after the default run and after ``--rounds 1``), with its sum unscaled and
each of its two parts alone after the default run.
``auto``: transductive accuracy of the default run with K in {5, 10, 20, 50} and with
``n_neighbors="auto"`` (and ``tau="auto"``), optionally with a fraction ``--noise`` of the labels
flipped (where the default is no longer the best). ``drop``: on the same rows (labeled rows drawn
per class or at random, ``--noise`` of them flipped), transductive accuracy of the default run and of
``--drop-suspects auto`` and ``0.1`` (the run again without the dropped labels), with how many were
dropped and how many of those were flipped. ``model``: ``llp-fast-propagate --save-model`` on
``--train`` synthetic rows (1% labeled), then ``--model`` on ``--n`` new rows in a child process
(wall time, peak resident memory) and ``LocalLabelPropagation.predict`` on the same fit: labels
compared (labels that differ, or a failed child run, stop with an error and write nothing).
``cost``: on ``--n`` synthetic rows (``--labeled`` of them labeled, 10% of those flipped), the
default run, the suspect score after it, and the spreading margin alone (its graph and solve, again
on the same voters), wall seconds; precision among the first n suspects for the record. Checked: first
the default run against the in-memory multi-round reference (tests/rounds_ref.py) on 5,000 of the rows,
voters capped; after the timing, the timed answers' invariants (``check_cost_invariants``).
``ceiling``: how far the suspect score is from what the same data could give. Per split, after the
default run: the score's precision; where its misses and false alarms rank (places after / before
the n-th); the run's accuracy on the unlabeled rows (with the flipped labels in); and the precision
of ranking each labeled row by the share of its K nearest other rows (weight exp(s / tau)) that carry
its label, read from the run's labels and from the *true* labels of the unlabeled rows (the labeled
rows' given labels, flips included): the second is what a labeller that got every unlabeled row
right would find with a plain vote.
Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_embeddings import (  # noqa: E402
    ROWS,
    child,
    default_tag,
    load,
    parse_seeds,
    seeds_arg,
    split,
    synthetic,
    write_result,
)

SUSPECT_ROWS = [("digits", 0.10), ("mnist5k", 0.10), ("mnist5k", 0.30)]


def flip(y: np.ndarray, labeled: np.ndarray, seed: int, rate: float = 0.1):
    """(labels with -1 unlabeled, a fraction ``rate`` of the labeled rows flipped to another class
    chosen at random; the flipped rows)."""
    rng = np.random.default_rng(10_000 + seed)
    idx = np.flatnonzero(labeled)
    flipped = rng.choice(idx, int(round(rate * len(idx))), replace=False)
    noisy = np.where(labeled, y, -1)
    noisy[flipped] = (y[flipped] + rng.integers(1, y.max() + 1, len(flipped))) % (y.max() + 1)
    return noisy, flipped


def random_split(y: np.ndarray, frac: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(len(y)) < frac


def plain_vote_ranking(x: np.ndarray, noisy: np.ndarray, k: int = 10, tau: float = 0.07) -> np.ndarray:
    """The labeled rows, lowest share of the leave-one-out vote for their own label first."""
    lab = np.flatnonzero(noisy >= 0)
    xl = x[lab].astype(np.float64)
    s = xl @ xl.T / tau
    np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(s, top, 1) - s.max(axis=1, keepdims=True))
    share = (w * (noisy[lab][top] == noisy[lab][:, None])).sum(1) / w.sum(1)
    return lab[np.argsort(share, kind="stable")]


def flipped_splits(y: np.ndarray, frac: float, seeds: str, how: str):
    """For each seed of ``seeds`` ("N", "A-B" or a comma list of those): (labels with -1 unlabeled
    and 10% of the labeled rows flipped, the flipped rows), the labeled rows drawn per class
    (``how="balanced"``) or each row with probability ``frac`` (``"random"``)."""
    for seed in parse_seeds(seeds):
        labeled = split(y, frac, seed) if how == "balanced" else random_split(y, frac, seed)
        yield flip(y, labeled, seed)


def ranked(lab: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The rows ``lab`` by ``score`` ascending (most suspect first), ties to the lower row."""
    return lab[np.lexsort((lab, score))]


def precision(ranking: np.ndarray, flipped: np.ndarray) -> float:
    return float(np.isin(ranking[: len(flipped)], flipped).mean())


def suspects(args) -> dict:
    import torch

    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.suspects import suspects_of

    torch.set_num_threads(1)
    out = {}
    for name, frac in SUSPECT_ROWS:
        x, y = load(name)
        row = out.setdefault(f"{name} {int(frac * 100)}%", {})
        for noisy, flipped in flipped_splits(y, frac, args.seeds, args.split):
            row.setdefault("plain leave-one-out vote", []).append(precision(plain_vote_ranking(x, noisy), flipped))
            for title, rounds in (("suspect score (default)", None), ("suspect score, --rounds 1", 1)):
                s = Settings(tau=args.tau) if rounds is None else Settings(tau=args.tau, rounds=rounds)
                t0 = time.perf_counter()
                result = label_embeddings(x, noisy, s, normalize=False)
                t1 = time.perf_counter()
                found = suspects_of(Rows(x, normalize=False), noisy, result, s)
                row.setdefault(title, []).append(precision(found.rows, flipped))
                row.setdefault(f"{title} s", []).append([t1 - t0, time.perf_counter() - t1])
                if rounds is None:  # the score's sum unscaled, and its two parts alone
                    parts = (
                        ("gap + margin, unscaled", found.gap + np.minimum(found.spread, 0.0)),
                        ("label gap alone", found.gap),
                        ("spreading margin alone", found.spread),
                    )
                    for part, value in parts:
                        row.setdefault(part, []).append(precision(ranked(found.labeled, value), flipped))
        print(
            f"{name} {int(frac * 100)}%: "
            + ", ".join(f"{m} {np.mean(v):.3f}" for m, v in row.items() if not m.endswith(" s")),
            flush=True,
        )
    methods = [m for m in next(iter(out.values())) if not m.endswith(" s")]
    print("\n| features, labels | " + " | ".join(methods) + " |\n|---" + "|---" * len(methods) + "|")
    for name, row in out.items():
        print(f"| {name} | " + " | ".join(f"{np.mean(row[m]):.3f}" for m in methods) + " |")
    return {"seeds": args.seeds, "split": args.split, "tau": args.tau, "rows": out}


def false_alarms(args) -> dict:
    """Digits at 10% labels, balanced splits ``--seeds``: the rows the label gap puts among the first
    n suspects without their label having been flipped, counted over the splits, and for each row
    flagged more than once what a supervised classifier says of its label: the out-of-fold
    probability of the label under an RBF SVM trained on 90% of *all* the data set's labels
    (10-fold, scikit-learn). A low probability means the data set's own label is doubtful."""
    import collections

    import torch
    from sklearn.model_selection import cross_val_predict
    from sklearn.svm import SVC

    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.suspects import suspects_of

    torch.set_num_threads(1)
    x, y = load("digits")
    flagged, labeled, missed = collections.Counter(), collections.Counter(), collections.Counter()
    n_alarms = n_flagged = 0
    for noisy, flipped in flipped_splits(y, 0.1, args.seeds, args.split):
        s = Settings(tau=args.tau)
        found = suspects_of(Rows(x, normalize=False), noisy, label_embeddings(x, noisy, s, normalize=False), s)
        alarms = np.setdiff1d(found.rows[: len(flipped)], flipped)
        flagged.update(alarms.tolist())
        missed.update(np.setdiff1d(flipped, found.rows[: len(flipped)]).tolist())
        labeled.update(np.flatnonzero(noisy >= 0).tolist())
        n_alarms += len(alarms)
        n_flagged += len(flipped)
    proba = cross_val_predict(SVC(C=10, gamma="scale", probability=True), x, y, cv=10, method="predict_proba")
    rows = [
        {"row": i, "label": int(y[i]), "false alarm": c, "labeled": labeled[i], "svm": int(proba[i].argmax()),
         "svm p(label)": round(float(proba[i, y[i]]), 3)}
        for i, c in flagged.most_common() if c > 1
    ]  # fmt: skip
    print(f"false alarms: {n_alarms} of {n_flagged} suspects, on {len(flagged)} rows; flagged more than once:")
    for r in rows:
        print("  ", r)
    twice = sum(r["false alarm"] for r in rows)
    doubtful = sum(r["false alarm"] for r in rows if r["svm p(label)"] < 0.5)
    print(f"{twice} of the false alarms on rows flagged more than once; {doubtful} on rows whose label the SVM doubts")
    most = max(missed.values(), default=0)
    print(f"missed flips: {sum(missed.values())} on {len(missed)} rows, at most {most} times the same row")
    return {"seeds": args.seeds, "split": args.split, "tau": args.tau, "false_alarms": n_alarms,
            "suspects": n_flagged, "rows": rows, "svm_accuracy": float((proba.argmax(1) == y).mean()),
            "missed": sum(missed.values()), "missed_rows": len(missed)}  # fmt: skip


def auto(args) -> dict:
    import torch

    from llp_fast.embeddings import Rows, Settings, label_embeddings, tune

    torch.set_num_threads(1)
    out = {}
    for name, frac in ROWS:
        x, y = load(name)
        row = out.setdefault(f"{name} {int(frac * 100)}%", {})
        for seed in parse_seeds(args.seeds):
            lab = split(y, frac, seed)
            labels = flip(y, lab, seed, args.noise)[0] if args.noise else np.where(lab, y, -1)
            runs = {f"K={k}": Settings(k=k) for k in (5, 10, 20, 50)}
            for title, (ak, at) in (("auto K", (True, False)), ("auto K, tau", (True, True))):
                t0 = time.perf_counter()
                c = tune.choose(Rows(x, normalize=False), labels, Settings(), auto_k=ak, auto_tau=at)
                row.setdefault(f"{title} choice", []).append([c.k, c.tau, time.perf_counter() - t0])
                runs[title] = Settings(k=c.k, tau=c.tau)
            for title, s in runs.items():
                pred = label_embeddings(x, labels, s, normalize=False).labels
                row.setdefault(title, []).append(float((pred[~lab] == y[~lab]).mean() * 100))
        print(
            f"{name} {int(frac * 100)}%: "
            + ", ".join(f"{m} {np.mean(v):.2f}" for m, v in row.items() if "choice" not in m),
            flush=True,
        )
    methods = [m for m in next(iter(out.values())) if "choice" not in m]
    print(
        "\n| features, labels | "
        + " | ".join(methods)
        + " | choices (K, tau) |\n|---"
        + "|---" * (len(methods) + 1)
        + "|"
    )
    for name, row in out.items():
        picks = ", ".join(f"{k}/{t:g}" for k, t, _ in row["auto K, tau choice"])
        print(f"| {name} | " + " | ".join(f"{np.mean(row[m]):.2f}" for m in methods) + f" | {picks} |")
    return {"seeds": args.seeds, "noise": args.noise, "rows": out}


def drop(args) -> dict:
    import torch

    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.suspects import drop_worst, suspects_of

    torch.set_num_threads(1)
    out, s = {}, Settings()
    for name, frac in ROWS:
        x, y = load(name)
        row = out.setdefault(f"{name} {int(frac * 100)}%", {})
        for seed in parse_seeds(args.seeds):
            lab = split(y, frac, seed) if args.split == "balanced" else random_split(y, frac, seed)
            labels, flipped = flip(y, lab, seed, args.noise) if args.noise else (np.where(lab, y, -1), [])
            first = label_embeddings(x, labels, s, normalize=False)
            row.setdefault("default", []).append(float((first.labels[~lab] == y[~lab]).mean() * 100))
            found = suspects_of(Rows(x, normalize=False), labels, first, s)
            for how in ("auto", 0.1):
                used, dropped = drop_worst(labels, found, how)
                again = label_embeddings(x, used, s, normalize=False) if len(dropped) else first
                row.setdefault(f"drop {how}", []).append(float((again.labels[~lab] == y[~lab]).mean() * 100))
                row.setdefault(f"drop {how} (dropped, flipped)", []).append(
                    [len(dropped), int(np.isin(dropped, flipped).sum())]
                )
        print(
            f"{name} {int(frac * 100)}%: "
            + ", ".join(f"{m} {np.mean(v):.2f}" for m, v in row.items() if "dropped" not in m)
            + "".join(f"; {m} {np.sum(v, axis=0).tolist()}" for m, v in row.items() if "dropped" in m),
            flush=True,
        )
    return {"seeds": args.seeds, "split": args.split, "noise": args.noise, "rows": out}


def _apply_command(model_dir: str, new: str, out: str, threads: int) -> list[str]:
    return [
        sys.executable, "-m", "llp_fast.cli.propagate", "--model", model_dir, new, "--out", out,
        "--threads", str(threads), "--quiet",
    ]  # fmt: skip


def model(args) -> dict:
    """--save-model on ``--train`` synthetic rows, then --model on ``--n`` new ones (a child
    process: wall time and peak RSS), compared with LocalLabelPropagation.predict: a failed child
    run or labels that differ stop the run (SystemExit, nothing written)."""
    import subprocess

    import torch

    from llp_fast import LocalLabelPropagation

    torch.set_num_threads(args.threads)
    train = os.path.join(args.workdir, f"n{args.train}-l0.01")
    synthetic(train, args.train, 0.01)
    new_dir = os.path.join(args.workdir, f"new{args.n}")
    synthetic(new_dir, args.n, 0.01, seed=0)  # the same clusters (seed 0), fresh rows past the first
    model_dir = os.path.join(args.workdir, f"model-{args.train}")
    emb, lab = os.path.join(train, "emb.npy"), os.path.join(train, "lab.npy")
    t0 = time.perf_counter()
    fit_cmd = [sys.executable, "-m", "llp_fast.cli.propagate", emb, lab, "--out", os.path.join(train, "p.npy")]
    subprocess.run([*fit_cmd, "--save-model", model_dir, "--threads", str(args.threads), "--quiet"], check=True)
    fit_s = time.perf_counter() - t0
    out = os.path.join(new_dir, "pred-model.npy")
    if os.path.exists(out):  # an earlier run's labels must not stand in for this one's
        os.remove(out)
    run = child(_apply_command(model_dir, os.path.join(new_dir, "emb.npy"), out, args.threads), args.limit)
    print("--model", json.dumps(run), flush=True)
    if run["status"] != "ok":
        raise SystemExit(f"model: the --model run failed ({run['status']}): nothing to compare, nothing written")
    x, labels = np.load(emb), np.load(lab)
    clf = LocalLabelPropagation().fit(x, labels)
    new = np.load(os.path.join(new_dir, "emb.npy"), mmap_mode="r")
    t0 = time.perf_counter()
    want = np.concatenate([clf.predict(np.asarray(new[a : a + 200_000])) for a in range(0, len(new), 200_000)])
    predict_s = time.perf_counter() - t0
    got = np.load(out)
    truth = np.load(os.path.join(new_dir, "truth.npy"))
    summary = {
        "n": args.n,
        "train": args.train,
        "voters": int(clf.voters_.shape[0]),
        "fit_and_save_s": fit_s,
        "model_run": run,
        "predict_s": predict_s,
        "labels_equal_predict": bool(np.array_equal(got, want)),
        "accuracy": float((got == truth).mean() * 100),
    }
    print(json.dumps(summary), flush=True)
    if not summary["labels_equal_predict"]:
        differ = f"{int((got != want).sum())} of {len(want)} rows" if got.shape == want.shape else "different shapes"
        raise SystemExit(
            f"model: --model's labels differ from LocalLabelPropagation.predict ({differ}): nothing written"
        )
    return summary


CHECK_ROWS = 5_000  # cost: the reference run's rows


def check_cost_reference(x: np.ndarray, noisy: np.ndarray, rows: int = CHECK_ROWS) -> str:
    """The timed default run against the multi-round scheme written on the in-memory ops
    (tests/rounds_ref.py), on the first ``rows`` rows, with the voters capped below the unlabeled rows as
    the default caps them at the timed N: labels and confidences identical. AssertionError otherwise."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from rounds_ref import rounds_reference

    from llp_fast.embeddings import Settings, label_embeddings

    xs = torch.nn.functional.normalize(torch.from_numpy(np.array(x[:rows], dtype=np.float32)), dim=1)
    ys = noisy[:rows].copy()
    lab = ys >= 0
    ys[lab] = np.unique(ys[lab], return_inverse=True)[1]  # compact class ids, as the reference takes them
    cap = int((~lab).sum()) // 5
    s = Settings(max_voters=cap)
    got = label_embeddings(xs.numpy(), ys, s, normalize=False)
    rounds = s.rounds_for(int(lab.sum()), int((~lab).sum()))  # (the default's "auto": 10 under this cap)
    want_l, want_c = rounds_reference(xs, ys.copy(), rounds=rounds, cap=cap)
    same_l, same_c = np.array_equal(got.labels, want_l), np.array_equal(got.confidence, want_c)
    msg = f"{rows} rows, {int(lab.sum())} labeled, {cap} voters at most: labels {'identical' if same_l else 'differ'}"
    msg += f", confidences {'identical' if same_c else 'differ'}"
    assert same_l and same_c, f"cost: label_embeddings against the in-memory reference ({msg}): not timing"
    return msg


def check_cost_invariants(noisy: np.ndarray, truth: np.ndarray, result, found, flipped: np.ndarray) -> str:
    """What the timed calls' answers must satisfy (AssertionError otherwise): the run keeps every given
    label, labels every unlabeled row with a given class at a confidence in [0, 1] and gets most of them
    right (synthetic clusters: well above the 1% of a guess); the suspects rank every labeled row once,
    most suspect first (scores ascending, quality = exp(score) in [0, 1], gaps <= 0), and their first
    n hold the n flipped rows at least twice as often as the 10% of a random ranking."""
    lab = noisy >= 0
    unl = ~lab
    bad = []
    if not np.array_equal(result.labels[lab], noisy[lab]):
        bad.append("a given label was changed")
    if not np.isin(result.labels[unl], result.classes).all():
        bad.append("an unlabeled row got no given class")
    conf = np.asarray(result.confidence, dtype=np.float64)
    if not (np.isfinite(conf).all() and conf.min() >= 0 and conf.max() <= 1 + 1e-6):
        bad.append(f"confidences outside [0, 1] ({conf.min():.3g} to {conf.max():.3g})")
    acc = float((result.labels[unl] == truth[unl]).mean())
    if acc < 0.3:
        bad.append(f"accuracy on the unlabeled rows {acc:.1%}")
    labeled = np.flatnonzero(lab)
    if not np.array_equal(found.labeled, labeled):
        bad.append("the suspects' labeled rows are not the labeled rows")
    if not np.array_equal(np.sort(found.rows), labeled):
        bad.append("the suspect ranking is not every labeled row once")
    score = found.score[np.searchsorted(found.labeled, found.rows)]
    if not (np.diff(score) >= 0).all():
        bad.append("the ranking is not by score ascending")
    if not np.allclose(found.quality, np.exp(found.score)) or not ((found.quality >= 0) & (found.quality <= 1)).all():
        bad.append("quality is not exp(score) in [0, 1]")
    if not (found.gap <= 0).all():
        bad.append("a gap above 0")
    prec = precision(found.rows, flipped)
    if prec < 0.2:
        bad.append(f"precision among the first {len(flipped)} suspects {prec:.1%}")
    msg = f"accuracy {acc:.1%}, suspects' precision {prec:.1%}"
    assert not bad, f"cost: the timed answers are wrong: {'; '.join(bad)} ({msg})"
    return msg


def cost(args) -> dict:
    import torch

    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.spread import graph_nodes, voter_margins
    from llp_fast.embeddings.suspects import suspects_of

    torch.set_num_threads(args.threads)
    path = os.path.join(args.workdir, f"n{args.n}-l{args.labeled:g}")
    synthetic(path, args.n, args.labeled)
    x = np.load(os.path.join(path, "emb.npy"))
    truth = np.load(os.path.join(path, "truth.npy"))
    labeled = np.load(os.path.join(path, "lab.npy")) >= 0
    noisy, flipped = flip(truth, labeled, 0)
    print("check:", check_cost_reference(x, noisy), flush=True)
    s = Settings()
    t0 = time.perf_counter()
    result = label_embeddings(x, noisy, s)
    t1 = time.perf_counter()
    rows = Rows(x)
    found = suspects_of(rows, noisy, result, s)
    t2 = time.perf_counter()
    y = np.searchsorted(result.classes, noisy[found.labeled])
    nodes = graph_nodes(result.voter_rows, found.labeled)
    voter_margins(
        rows.take(nodes), nodes, found.labeled, y, result.voter_rows, result.voter_classes, len(result.classes)
    )
    t3 = time.perf_counter()
    print("check:", check_cost_invariants(noisy, truth, result, found, flipped), flush=True)
    out = {
        "n": args.n, "labeled": int(labeled.sum()), "voters": int(len(result.voter_rows)), "threads": args.threads,
        "run_s": t1 - t0, "suspects_s": t2 - t1, "spread_s": t3 - t2, "precision": precision(found.rows, flipped),
    }  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


def ceiling(args) -> dict:
    import torch

    from llp_fast.embeddings import Rows, Settings, label_embeddings
    from llp_fast.embeddings.suspects import suspects_of

    torch.set_num_threads(1)
    out = {}
    for name, frac in SUSPECT_ROWS:
        x, y = load(name)
        sim = x.astype(np.float64) @ x.astype(np.float64).T
        np.fill_diagonal(sim, -np.inf)
        row = out.setdefault(f"{name} {int(frac * 100)}%", {"miss places": [], "alarm places": []})
        for noisy, flipped in flipped_splits(y, frac, args.seeds, args.split):
            s = Settings(tau=args.tau)
            result = label_embeddings(x, noisy, s, normalize=False)
            found = suspects_of(Rows(x, normalize=False), noisy, result, s)
            n, lab = len(flipped), found.labeled
            place = {int(r): i for i, r in enumerate(found.rows)}
            row["miss places"] += [place[int(r)] - n for r in flipped if place[int(r)] >= n]
            row["alarm places"] += [n - i for i, r in enumerate(found.rows[:n]) if not np.isin(r, flipped)]
            row.setdefault("suspect score", []).append(precision(found.rows, flipped))
            unl = noisy < 0
            row.setdefault("run accuracy, unlabeled rows", []).append(float((result.labels[unl] == y[unl]).mean()))
            true_or_given = np.where(unl, y, noisy)
            for k in (10, 20):
                near = np.argsort(-sim[lab], axis=1, kind="stable")[:, :k]
                w = np.exp((np.take_along_axis(sim[lab], near, 1) - 1.0) / args.tau)
                for title, labels in (("the run's labels", result.labels), ("true labels", true_or_given)):
                    share = (w * (labels[near] == noisy[lab][:, None])).sum(1) / w.sum(1)
                    row.setdefault(f"share of {k} nearest, {title}", []).append(precision(ranked(lab, share), flipped))
        means = {m: round(float(np.mean(v)), 4) for m, v in row.items() if "places" not in m}
        near_n = sum(p <= 2 for p in row["miss places"])
        print(
            f"{name} {int(frac * 100)}%: {means}; misses {len(row['miss places'])} ({near_n} within 2 places "
            f"after the n-th), false alarms {len(row['alarm places'])}",
            flush=True,
        )
    return {"seeds": args.seeds, "split": args.split, "tau": args.tau, "rows": out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("suspects", "false-alarms", "auto", "drop", "model", "cost", "ceiling"))
    ap.add_argument("--seeds", type=seeds_arg, default="0-4", help="N, A-B or a comma list of those")
    ap.add_argument("--split", choices=("balanced", "random"), default="balanced")
    ap.add_argument("--noise", type=float, default=0.0, help="auto, drop: flip this fraction of the labels first")
    ap.add_argument("--tau", type=float, default=0.07, help="suspects: the runs' temperature")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--train", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--labeled", type=float, default=0.01, help="cost: the fraction of labeled rows")
    ap.add_argument("--limit", type=float, default=1800.0)
    ap.add_argument("--workdir", default="/tmp/llp_fast_bench_embeddings")
    ap.add_argument("--tag", default=None, help="the results file's tag (default: the host name and CPU kind)")
    args = ap.parse_args(argv)
    args.tag = args.tag or default_tag()
    modes = {
        "suspects": suspects, "false-alarms": false_alarms, "auto": auto, "drop": drop, "model": model,
        "cost": cost, "ceiling": ceiling,
    }  # fmt: skip
    result = modes[args.mode](args)
    if args.mode == "model":  # no seeds: named by its sizes
        name = f"suspects_model-n{args.n}-train{args.train}-{args.tag}.json"
    elif args.mode == "cost":
        name = f"suspects_cost-n{args.n}-l{args.labeled:g}-t{args.threads}-{args.tag}.json"
    else:
        what = f"noise{args.noise:g}-" if args.noise else ""
        if args.mode == "drop":
            what = f"{args.split}-noise{args.noise:g}-"
        if args.mode in ("suspects", "ceiling"):
            what = args.split + (f"-tau{args.tau:g}-" if args.tau != 0.07 else "")
        name = f"suspects_{args.mode}-{what}{args.seeds}-{args.tag}.json"
    write_result(result, name)


if __name__ == "__main__":
    main()
