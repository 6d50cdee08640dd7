"""``llp-fast-propagate``: LLP labels for precomputed embeddings (docs/method.md §1.1-1.2)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError, DataError
from . import _common

PROG = "llp-fast-propagate"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="One-shot LLP labelling of precomputed embeddings: density-weighted K-nearest-labeled-"
        "neighbour votes (docs/method.md §1.1-1.2), streamed in chunks from memory-mapped .npy files.",
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
        raise DataError(f"{what} {path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {what} {path} as a .npy array ({type(e).__name__})") from None


def propagate_files(args) -> dict:
    """Streams EMB.npy in chunks of ``args.chunk`` rows: only the M labeled rows, their
    running top-T density scores and one chunk live in memory; the output is written to a
    memory-mapped .npy next to ``--out`` and moved into place when complete."""
    import numpy as np
    import torch

    from .._validate import temperature
    from ..ops import propagate

    t0 = time.perf_counter()
    emb = _open_npy(args.embeddings, "embeddings")
    lab = _open_npy(args.labels, "labels")
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise DataError(f"embeddings must be a 2-D float array (N, D), got {emb.dtype} {emb.shape}")
    n, _ = emb.shape
    if lab.ndim != 1 or lab.shape[0] != n or not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array of {n} entries, got {lab.dtype} {lab.shape}")
    labels = np.asarray(lab, dtype=np.int64)
    if (labels < -1).any():
        raise DataError("labels holds values below -1 (-1 marks unlabeled)")
    lab_rows = np.flatnonzero(labels >= 0)
    m = len(lab_rows)
    if m == 0:
        raise DataError("labels holds no labeled row (no entry >= 0)")
    if not 0 < args.k <= m:
        raise ConfigError(f"--k must lie in [1, {m}] (the number of labeled rows), got {args.k}")
    if args.chunk < 1:
        raise ConfigError(f"--chunk must be positive, got {args.chunk}")
    tau = temperature(args.tau)
    num_classes = int(labels.max()) + 1
    dev = torch.device(args.device)

    def rows(a, b):
        x = torch.from_numpy(np.array(emb[a:b], dtype=np.float32)).to(dev)
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"embeddings rows {a}..{b} contain NaN or Inf")
        return x if args.no_normalize else torch.nn.functional.normalize(x, dim=1)

    labeled = torch.from_numpy(np.array(emb[lab_rows], dtype=np.float32)).to(dev)
    if not args.no_normalize:
        labeled = torch.nn.functional.normalize(labeled, dim=1)
    classes = torch.from_numpy(labels[lab_rows]).to(dev)
    is_lab = torch.from_numpy(labels >= 0)
    log_rho = None
    if not args.no_density_weighting:  # docs/method.md §1.1, streamed: a running top-T per labeled row
        pool = n - m if args.density_pool == "unlabeled" else n
        if not 0 < args.t <= pool:
            raise ConfigError(f"--t must lie in [1, {pool}] (the density pool), got {args.t}")
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
        raise ConfigError(f"--out {args.out}: directory {out_dir} does not exist")
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


def _main(args) -> int:
    stats = propagate_files(args)
    print(
        f"llp-fast-propagate: labelled {stats['unlabeled']} of {stats['n']} rows from {stats['labeled']} labeled "
        f"in {stats['seconds']:.2f} s -> {args.out}"
    )
    return 0


def main(argv=None) -> int:
    """``llp-fast-propagate EMB.npy LABELS.npy --out PSEUDO.npy``."""
    return _common.run(PROG, _main, parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
