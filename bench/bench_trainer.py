"""The trainer's accuracy table (docs/results.md): ``llp-fast-train`` variants over settings and seeds,
and the fixed-feature baselines on the same splits.

    python bench/bench_trainer.py runs --settings d2,m2 --seeds 0,1,2 --variants plus,paper,supervised
    python bench/bench_trainer.py pixels --settings d2,d10,m2,m10 --seeds 0,1,2
    python bench/bench_trainer.py table                       # the collected rows as a Markdown table

``runs`` trains each (setting, variant, seed) with ``python -m llp_fast.cli`` and its default flags plus
the variant's, ``--threads 1``, two runs at a time (``--parallel``), and appends the last epoch's
metrics to ``bench/results/trainer-runs.jsonl`` (a run already there is skipped). ``pixels`` scores,
on the held-out split of the same data split, the multi-round vote of docs/method.md §7 on the
training images' centred, L2-normalised pixels (``LocalLabelPropagation().fit(...).predict``) and
scikit-learn's ``LabelSpreading(kernel="knn", n_neighbors=10)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the benchmarks' flag types)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join(RESULTS, "trainer-runs.jsonl")
PIXELS = os.path.join(RESULTS, "trainer-pixels.jsonl")

SETTINGS = {
    "d2": ["--data", "digits", "--labeled-fraction", "0.02"],
    "d10": ["--data", "digits", "--labeled-fraction", "0.1"],
    "m2": ["--data", "mnist5k", "--labeled-fraction", "0.02"],
    "m10": ["--data", "mnist5k", "--labeled-fraction", "0.1"],
    "d1": ["--data", "digits", "--labeled-fraction", "0.01"],
    "m1": ["--data", "mnist5k", "--labeled-fraction", "0.01"],
}
VARIANTS = {
    "plus": [],  # the default
    "paper": ["--method", "paper"],
    "supervised": ["--supervised-only"],
    "fixmatch": ["--method", "fixmatch"],
    "no-consistency": ["--consistency", "0"],
    "no-refresh": ["--refresh-rounds", "0"],
    "no-ema": ["--ema", "0"],
    "one-round-start": ["--start-rounds", "1"],
    "no-local": ["--no-local-propagation"],
    "agree": ["--consistency-target", "agree"],
    "as-npz": [],  # the same split's images written to an npz (_as_npz), trained with no other flag
}


def _as_npz(setting: str, seed: int, work: str) -> list:
    """``--data npz:FILE`` for the setting's split at ``seed``, written as a user would (images, labels
    with -1 for the unlabeled, the held-out set): the run must equal the built-in one (``plus``, the same
    setting, seed and tag, in ``--work``): its metrics rows are compared, timing fields apart, and a
    difference is the row's error and exit status 1."""
    from llp_fast.data import load

    name, frac = SETTINGS[setting][1], float(SETTINGS[setting][3])
    src = load(name, labeled_fraction=frac, seed=seed)
    path = os.path.abspath(os.path.join(work, f"{setting}-s{seed}.npz"))
    os.makedirs(work, exist_ok=True)
    np.savez(
        path, x=src.x[:, 0].numpy(), y=src.targets.numpy(), x_test=src.x_test[:, 0].numpy(), y_test=src.y_test.numpy()
    )
    return ["--data", f"npz:{path}"]


def _plan(args) -> list[tuple[str, str]]:
    """(setting, variant) pairs in the order they run: ``--plan "d2:plus,paper;m2:plus"`` or every
    pair of ``--settings`` x ``--variants``."""
    if args.plan:
        return [(s, v) for part in args.plan.split(";") for s, vs in [part.split(":")] for v in vs.split(",")]
    return [(s, v) for s in args.settings.split(",") for v in args.variants.split(",")]


def _done(path: str) -> dict:
    """The rows of the runs that finished, by key; a failed run's row (rc != 0, an error) is run again."""
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {r["key"]: r for r in rows if r.get("rc", 0) == 0 and "error" not in r}


TIMING = ("seconds", "_per_s", "_ms")  # metrics fields that hold times (they differ run to run)
# Metrics of the unlabeled training rows' true labels, which the npz (written as a user would, -1 for the
# unlabeled) does not hold: the built-in data set knows them, so only the built-in run has them.
TRUTH = ("pseudo_acc", "aggregation", "aggregation_per_class")


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]


def same_as_builtin(run_dir: str, builtin_dir: str) -> str | None:
    """None when the as-npz run's metrics rows equal the built-in run's, field by field apart from the
    timing fields (``TIMING``) and those of the unlabeled rows' truth (``TRUTH``), else where they first
    differ; 'no built-in run' when it has none."""
    if not os.path.exists(os.path.join(builtin_dir, "metrics.jsonl")):
        return f"no built-in run to compare with ({builtin_dir})"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(TIMING) and k not in TRUTH} for r in rows]  # noqa: E731
    mine, theirs = strip(_metrics(run_dir)), strip(_metrics(builtin_dir))
    if len(mine) != len(theirs):
        return f"{len(mine)} epochs against the built-in run's {len(theirs)}"
    for a, b in zip(mine, theirs):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"epoch {a.get('epoch')}: {k} {a.get(k)!r} against the built-in run's {b.get(k)!r}"
    return None


def _finish(proc, key, run_dir, t0, extra, results, builtin_dir=None) -> bool:
    """Appends the run's row; with ``builtin_dir`` (an as-npz run) it is compared with the built-in run's
    metrics first. False when the run failed or differs."""
    rows = _metrics(run_dir) if proc.returncode == 0 else []
    last = rows[-1] if rows else {}
    row = {
        "key": key,
        "rc": proc.returncode,
        "top1": last.get("test_top1"),
        "top1_trained": last.get("test_top1_trained"),
        "pseudo_acc": last.get("pseudo_acc"),
        "epochs": len(rows),
        "epoch_seconds": float(np.mean([r["epoch_seconds"] for r in rows])) if rows else None,
        "wall_seconds": round(time.time() - t0, 1),
        "load": os.getloadavg()[0],
        **extra,
    }
    if proc.returncode != 0:
        row["error"] = open(run_dir + ".log", errors="replace").read()[-600:]
    elif builtin_dir is not None:
        differs = same_as_builtin(run_dir, builtin_dir)
        row["equals_builtin"] = differs is None
        if differs is not None:
            row["error"] = f"as-npz differs from the built-in run: {differs}"
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return "error" not in row


def runs(args) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    done, queue, skipped, commit = _done(args.results), [], 0, common.git_commit()
    for s, v in _plan(args):
        for seed in args.seeds.split(","):
            key = f"{s}/{v}/s{seed}" + (f"/{args.tag}" if args.tag else "")
            if key in done:
                # (a run with other --extra flags was skipped without a word, its old row read as the new one's)
                before = done[key].get("extra", args.extra)
                if before != args.extra:
                    raise SystemExit(
                        f"{key} is in {args.results} with --extra {before!r}, not {args.extra!r}: give another "
                        "--tag or --results"
                    )
                skipped += 1
                continue
            data = _as_npz(s, int(seed), args.work) if v == "as-npz" else SETTINGS[s]
            argv = [*data, *VARIANTS[v], "--seed", seed, *args.extra.split()]
            extra = dict(setting=s, variant=v, seed=int(seed), tag=args.tag, flags=" ".join(argv), extra=args.extra)
            extra["commit"] = commit
            queue.append((key, argv, extra))
    if skipped:
        print(f"{skipped} of the planned runs are in {args.results} already: not run again", flush=True)
    running, held, ok = [], [], True
    while queue or running:
        while queue and len(running) < args.parallel:
            key, argv, extra = queue.pop(0)
            run_dir = os.path.join(args.work, key.replace("/", "-"))
            cmd = [sys.executable, "-m", "llp_fast.cli", *argv, "--threads", "1", "--quiet", "--baseline", "off"]
            cmd += ["--run-dir", run_dir]
            subprocess.run(["rm", "-rf", run_dir], check=True)
            log = open(run_dir + ".log", "w")
            running.append(
                (
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                    key,
                    run_dir,
                    time.time(),
                    extra,
                    args.results,
                )
            )
        for item in list(running):
            if item[0].poll() is not None:
                running.remove(item)
                if item[4]["variant"] == "as-npz":  # compared with the built-in run once that has finished too
                    held.append(item)
                else:
                    ok &= _finish(*item)
        if queue or running:
            time.sleep(2)
    for item in held:
        builtin = item[1].replace("/as-npz/", "/plus/")
        ok &= _finish(*item, builtin_dir=os.path.join(args.work, builtin.replace("/", "-")))
    if not ok:
        sys.exit("runs: a run failed, or an as-npz run differs from the built-in one (see its row's error)")


def pixels(args) -> None:
    from sklearn.semi_supervised import LabelSpreading

    from llp_fast import LocalLabelPropagation
    from llp_fast.data import load

    os.makedirs(RESULTS, exist_ok=True)
    stamp = {"commit": common.git_commit(), "command": common.command_line()}
    done = _done(PIXELS)
    for s in args.settings.split(","):
        name, frac = SETTINGS[s][1], float(SETTINGS[s][3])
        for seed in map(int, args.seeds.split(",")):
            key = f"{s}/s{seed}"
            if key in done:
                continue
            src = load(name, labeled_fraction=frac, seed=seed)  # the trainer's own split
            x = src.x.flatten(1).double().numpy()
            xt = src.x_test.flatten(1).double().numpy()
            mean = x.mean(0)

            def unit(a, mean=mean):
                a = a - mean
                return (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)).astype(np.float32)

            y, yt = src.targets.numpy(), src.y_test.cpu().numpy()
            vote = LocalLabelPropagation().fit(unit(x), y)
            spread = LabelSpreading(kernel="knn", n_neighbors=10).fit(unit(x), y)
            row = {
                "key": key,
                "setting": s,
                "seed": seed,
                "vote": float((vote.predict(unit(xt)) == yt).mean()),
                "label_spreading": float((spread.predict(unit(xt)) == yt).mean()),
                **stamp,
            }
            with open(PIXELS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def table(args) -> None:
    rows = []
    for path in [RUNS, *args.more]:
        if os.path.exists(path):
            rows += [json.loads(line) for line in open(path) if line.strip()]
    px = {json.loads(line)["key"]: json.loads(line) for line in open(PIXELS)} if os.path.exists(PIXELS) else {}
    by = {}
    for r in rows:
        by.setdefault((r.get("tag") or "cpu", r["setting"], r["variant"]), {})[r["seed"]] = r["top1"]
    print("| where | setting | variant | seeds 0 / 1 / 2 | mean | min |\n| --- | --- | --- | --- | --- | --- |")
    for (tag, s, v), seeds in sorted(by.items()):
        vals = [100 * seeds[k] for k in sorted(seeds) if seeds[k] is not None]
        if vals:
            cells = " / ".join(f"{x:.2f}" for x in vals)
            print(f"| {tag} | {s} | {v} | {cells} | {np.mean(vals):.2f} | {min(vals):.2f} |")
    for kind in ("vote", "label_spreading"):
        per = {}
        for r in px.values():
            per.setdefault(r["setting"], {})[r["seed"]] = r[kind]
        for s, seeds in sorted(per.items()):
            vals = [100 * seeds[k] for k in sorted(seeds)]
            cells = " / ".join(f"{x:.2f}" for x in vals)
            print(f"| cpu | {s} | {kind} (pixels) | {cells} | {np.mean(vals):.2f} | {min(vals):.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("runs")
    r.add_argument("--settings", default="d2,d10,m2")
    r.add_argument("--variants", default="plus")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--parallel", type=common.positive_int, default=2)
    r.add_argument("--extra", default="", help="more llp-fast-train flags for every run")
    r.add_argument("--plan", default="", help='(setting, variant) pairs in order: "d2:plus,paper;m2:plus"')
    r.add_argument("--tag", default="", help="names the hardware or flags of these runs (part of each key)")
    r.add_argument("--results", default=RUNS, help="the JSON-lines file the rows go to")
    r.add_argument("--work", default=os.path.join("runs", "bench-trainer"))
    p = sub.add_parser("pixels")
    p.add_argument("--settings", default="d2,d10,m2,m10")
    p.add_argument("--seeds", default="0,1,2")
    t = sub.add_parser("table")
    t.add_argument("more", nargs="*", help="more JSON-lines files of runs (e.g. a GPU session's)")
    args = ap.parse_args(argv)
    for flag, names, known in (
        ("settings", getattr(args, "settings", ""), SETTINGS),
        ("variants", getattr(args, "variants", ""), VARIANTS),
    ):
        unknown = [n for n in names.split(",") if n and n not in known]
        if unknown:  # (a KeyError traceback)
            ap.error(f"--{flag}: unknown {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    for s, v in _plan(args) if args.cmd == "runs" and args.plan else ():
        if s not in SETTINGS or v not in VARIANTS:
            ap.error(f"--plan: unknown setting {s!r} or variant {v!r}")
    {"runs": runs, "pixels": pixels, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
