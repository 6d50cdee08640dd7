"""``llp-fast-linear-probe``: transfer by linear readout (paper §4 Table 4, Appendix C)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from .. import _checks as C
from .. import _files
from .._files import atomic_open
from .._progress import Progress
from ..data.extra import native_format
from ..errors import ConfigError
from ..probe import probe_features, train_readout
from ..train.defaults import default_device
from ..train.trained import load_network
from . import _common

PROG = "llp-fast-linear-probe"
SGD_FLAGS = ("lr", "momentum", "weight_decay", "batch_size", "epochs", "patience", "drops")


_VAL_FRACTION = _common.checked(float, C.below_one, "a number")


def _lr(text: str) -> float:
    """``--lr``: a number > 0 that the readout's float32 state can hold (below 1e30)."""
    value = _common.POSITIVE_FLOAT(text)
    if value >= 1e30:
        raise argparse.ArgumentTypeError(f"expected a number below 1e30, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Freeze a trained network and fit a linear readout on its pooled features of another labeled "
        "data set (paper §4, Appendix C); report held-out top-1 and top-5.",
    )
    _common.add_version(ap)
    ap.add_argument(
        "checkpoint", type=_common.path, metavar="CHECKPOINT_OR_RUN_DIR", help="a run's checkpoint.pt, or its directory"
    )
    ap.add_argument(
        "--data", type=_common.DATA, required=True, help="the probe data: digits, mnist5k, npz:PATH or folder:PATH"
    )
    ap.add_argument("--out", type=_common.path, default=None, help="JSON file for the results (default: print only)")
    ap.add_argument(
        "--solver",
        choices=("sgd", "lbfgs"),
        default="sgd",
        help="sgd (default): the paper's schedule (the flags below to --drops); lbfgs: logistic regression to "
        "convergence, its L2 strength chosen on the validation split (1e-3 with --val-fraction 0)",
    )
    ap.add_argument("--lr", type=_lr, default=0.01, help="initial learning rate (default 0.01, paper)")
    ap.add_argument("--momentum", type=_common.MOMENTUM, default=0.9, help="SGD momentum (default 0.9)")
    ap.add_argument("--weight-decay", type=_common.NONNEG_FLOAT, default=0.0, help="SGD weight decay (default 0)")
    ap.add_argument("--batch-size", type=_common.POSITIVE_INT, default=128, help="readout batch size (default 128)")
    ap.add_argument("--epochs", type=_common.POSITIVE_INT, default=200, help="most readout epochs (default 200)")
    ap.add_argument(
        "--patience",
        type=_common.POSITIVE_INT,
        default=5,
        help="epochs without a better validation top-1 before x0.1 (default 5)",
    )
    ap.add_argument(
        "--drops", type=_common.COUNT, default=2, help="learning-rate drops before stopping (default 2, paper)"
    )
    ap.add_argument(
        "--val-fraction",
        type=_VAL_FRACTION,
        default=0.1,
        help="of the probe training part (default 0.1; 0: none, the training loss decides)",
    )
    ap.add_argument("--no-standardize", action="store_true", help="feed the raw features to the readout")
    ap.add_argument("--random-init", action="store_true", help="control: the same network, untrained")
    ap.add_argument(
        "--pixels", action="store_true", help="control: the readout on the network's input pixels, no network"
    )
    ap.add_argument(
        "--seed",
        type=_common.SEED,
        default=0,
        help="seed of the data's split, the validation split and the readout's start (default 0)",
    )
    ap.add_argument(
        "--repeats",
        type=_common.POSITIVE_INT,
        default=1,
        help="readouts on the same features (seeds SEED.. SEED+R-1); mean and std (default 1)",
    )
    ap.add_argument(
        "--device",
        type=_common.DEVICE,
        default=None,
        help="cpu or cuda for the feature extraction (default: cuda when available)",
    )
    ap.add_argument(
        "--threads", type=_common.THREADS, default=0, help="CPU threads for torch (default: torch's choice)"
    )
    ap.add_argument(
        "--workers",
        type=_common.THREADS,
        default=0,
        help="DataLoader workers for folder data (default 0: in this process)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def _main(args) -> int:
    t0 = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.out:
        if why := _files.parent_problem(args.out):
            raise ConfigError(f"--out {args.out}: {why}")
        _common.not_an_input(args.out, args.checkpoint, args.data, data_flag="--data")
    device = _common.cuda_checked(args.device or default_device())
    torch.manual_seed(args.seed)
    model, cfg, net_source = load_network(args.checkpoint, device, random_init=args.random_init)
    xtr, ytr, xte, yte, s = probe_features(
        model,
        net_source,
        args.data,
        seed=args.seed,
        workers=args.workers,
        pixels=args.pixels,
        progress=Progress(enabled=not args.quiet, prog=PROG),
    )
    t_feat = time.perf_counter() - t0
    runs = [
        train_readout(
            xtr,
            ytr,
            xte,
            yte,
            s,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            epochs=args.epochs,
            patience=args.patience,
            drops=args.drops,
            val_fraction=args.val_fraction,
            standardize=not args.no_standardize,
            seed=args.seed + r,
            solver=args.solver,
        )
        for r in range(args.repeats)
    ]
    # repeats share the features and the test split; they redraw the validation split,
    # the readout's initialisation and the mini-batch order
    # at the top: what every readout shares, and the means (and the test scores' std) of what each
    # measures; each readout's own numbers in "repeats" (its epochs and drops were readout 0's)
    own = ("test_top1", "test_top5", "val_top1", "fit_top1", "best_epoch", "epochs_run", "lr_drops")
    own += ("l2",) if "l2" in runs[0] else ()  # (lbfgs: each readout's own choice, on its validation split)
    res = dict(runs[0]) if len(runs) == 1 else {k: v for k, v in runs[0].items() if k not in own}
    for key in ("test_top1", "test_top5", "val_top1", "fit_top1"):
        vals = [r[key] for r in runs]
        res[key] = None if None in vals else float(np.mean(vals))
        if key.startswith("test"):
            res[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    res["repeats"] = [{k: r[k] for k in own} for r in runs]
    fmt = native_format(net_source)
    res = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "network_trained_on": cfg.data,
        "supervised_only": bool(cfg.supervised_only),
        "method": cfg.method,
        "random_init": bool(args.random_init),
        "pixels": bool(args.pixels),
        "probe_data": args.data,
        "input": {"channels": fmt[1], "side": fmt[2], "network_side": int(net_source.image_size)},
        **res,
        "feature_seconds": round(t_feat, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.out:
        with atomic_open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    trained = "FixMatch-style" if cfg.method == "fixmatch" else "LLP"  # (a FixMatch run was called "LLP")
    net = "random-init" if args.random_init else ("supervised-only" if cfg.supervised_only else trained)
    net = f"raw pixels (input format of the {net}" if args.pixels else net
    pm1 = pm5 = ""
    if args.repeats > 1:
        pm1 = f" ± {100 * res['test_top1_std']:.1f}"
        pm5 = f" ± {100 * res['test_top5_std']:.1f}"
    print(
        f"{PROG}: {net} network ({cfg.data}){')' if args.pixels else ''} -> {args.data} ({res['num_classes']} classes, "
        f"{res['input']['channels']}x{res['input']['side']}px): held-out top-1 {100 * res['test_top1']:.1f}%{pm1} "
        f"top-5 {100 * res['test_top5']:.1f}%{pm5} (chance {100 * res['chance_top1']:.1f}%, {res['num_fit']} fit / "
        f"{res['num_val']} val / {res['num_test']} test, {args.repeats} readout(s), {res['seconds']:.1f} s)"
    )
    return 0


def main(argv=None) -> int:
    ap = parser()
    args = _common.parse(ap.parse_args, argv)
    if args.pixels and args.random_init:
        ap.error("argument --random-init: not with --pixels (the pixels control uses no network)")
    sgd = [f"--{n.replace('_', '-')}" for n in SGD_FLAGS if getattr(args, n) != ap.get_default(n)]
    if args.solver == "lbfgs" and sgd:  # (they would be ignored)
        ap.error(f"argument {sgd[0]}: the sgd solver's; --solver lbfgs fits to convergence and chooses its L2")
    if args.seed + args.repeats > 2**63:  # readout r is seeded SEED + r
        ap.error(f"argument --seed: SEED + REPEATS - 1 must stay below 2**63, got {args.seed} + {args.repeats - 1}")
    with _common.sigterm_as_interrupt():
        return _common.run(PROG, _main, args)


if __name__ == "__main__":
    sys.exit(main())
