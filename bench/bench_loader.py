"""``folder:`` loaders in images/s: NVIDIA DALI (CPU) against the PIL DataLoader, as the trainer runs them.

    PYTHONPATH=. python bench/bench_loader.py                    # 384 JPEGs of 256 px, 8 classes, 224 px out, 2 workers
    PYTHONPATH=. python bench/bench_loader.py --images 128 --reps 3 --out /tmp/loader.json   # a quick run

Providers (``FolderSource(loader=...)``, the trainer's own data path):

    pil        the PIL DataLoader: ``--workers`` worker processes decode, crop and resize
    dali-cpu   DALI's CPU pipeline: ``--workers`` threads decode and resize (llp_fast.data.dali)

Both passes the trainer makes over a folder are timed: ``train`` (one epoch of random resized crops
and flips, ``train_batches``) and ``eval`` (resize the short side, centre crop: ``index_batches``
over every training image), each from the first batch to the last normalised float batch in
memory, loader start-up included (the trainer starts a new DataLoader or DALI pipeline each
pass). Providers are timed in interleaved rounds, so that a change of load on a shared machine
hits both alike; medians over ``--reps`` rounds.

Correctness first: every provider's pass yields each index once in the order asked, batches of
(B, 3, S, S) float32 within the normalised range of 0..255; and DALI's images are compared with
PIL's (same crops and flips): the largest difference off the border rows and columns and the
mean difference over all pixels, in grey levels, held to tests/test_dali.py's bound (1 and 0.5): past it
the run stops with an error before anything is timed.
One JSON row per provider and pass goes to ``loader-<host>.json`` in ``$OUT`` when set (a GPU
session's results come back from there), else in ``bench/results`` (or to ``--out``). DALI's
images are checked against PIL's before anything is timed, whichever providers are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402

from llp_fast import _optional  # noqa: E402
from llp_fast.data import DataError, load  # noqa: E402
from llp_fast.data.transforms import MEAN, STD  # noqa: E402

PROVIDERS = {"pil": "pil", "dali-cpu": "dali"}
INNER_LEVELS, MEAN_LEVELS = 1, 0.5  # DALI against PIL, grey levels of 255 (tests/test_dali.py's docstring)


def synthetic_jpegs(root: Path, *, images: int, classes: int, size: int, seed: int = 0) -> Path:
    """``images`` size x size RGB JPEGs (quality 90) in ``classes`` folders: gradients, discs and
    noise, so that the entropy-coded data are of a photograph's order (about 20-30 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for n in range(images):
        c = n % classes
        path = root / f"class{c:02d}" / f"{n:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        a = np.stack([xx, yy, (xx + yy) / 2], -1) * (255 / size) + rng.normal(0, 12, (size, size, 3))
        a[..., c % 3] += 40
        for _ in range(6):
            cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(8, size // 4))]
            a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def passes(src, batch_size: int, seed: int):
    """{pass name: (make the pass's batches, the dataset indices it must yield in order)}."""
    order = torch.randperm(src.num_train, generator=torch.Generator().manual_seed(seed))
    every = torch.arange(src.num_train)
    return {
        "train": (lambda: src.train_batches(order, batch_size, None, epoch=1), order),
        "eval": (lambda: src.index_batches(every, batch_size), every),
    }


def check(name: str, batches, expect: torch.Tensor, size: int) -> torch.Tensor:
    """The pass's images, after checking indices, shapes, dtype and range."""
    lo = min(-m / s for m, s in zip(MEAN, STD)) - 1e-4  # 0 and 255, normalised
    hi = max((1 - m) / s for m, s in zip(MEAN, STD)) + 1e-4
    xs, idx = [], []
    for x, i in batches:
        if x.dtype != torch.float32 or x.shape[1:] != (3, size, size) or x.shape[0] != i.shape[0]:
            raise SystemExit(f"{name}: batch of {tuple(x.shape)} {x.dtype} for {i.shape[0]} indices")
        if not (torch.isfinite(x).all() and x.min() >= lo and x.max() <= hi):
            raise SystemExit(f"{name}: values outside the normalised range [{lo:.3f}, {hi:.3f}]")
        xs.append(x)
        idx.append(i)
    got = torch.cat(idx)
    if not torch.equal(got, expect):
        raise SystemExit(f"{name}: indices are not each index once in the order asked")
    return torch.cat(xs)


def run_pass(make) -> int:
    n = 0
    for x, _ in make():
        n += x.shape[0]
    return n


def versions() -> dict:
    import PIL

    dali = _optional.dali()
    return {
        "dali": getattr(dali, "__version__", None) if dali is not None else None,
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384, help="JPEGs in the synthetic folder")
    p.add_argument("--classes", type=int, default=8, help="class folders")
    p.add_argument("--source-size", type=int, default=256, help="side of the JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="output side (the network input)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="PIL DataLoader workers = DALI threads")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (each: one pass of every provider)")
    p.add_argument("--providers", default="pil,dali-cpu", help="comma-separated: " + ", ".join(PROVIDERS))
    p.add_argument("--folder", default=None, help="where to write (or reuse) the synthetic JPEGs")
    p.add_argument(
        "--out", default=None, help="JSON file (default loader-<host>.json in $OUT if set, else in bench/results)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.workers))
    names = [n for n in args.providers.split(",") if n]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names:  # (a KeyError traceback)
        p.error(
            f"argument --providers: unknown {', '.join(map(repr, unknown)) or 'none given'} ({', '.join(PROVIDERS)})"
        )
    for flag in ("images", "classes", "batch_size", "reps"):
        if getattr(args, flag, 1) < 1:
            p.error(f"argument --{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    if "dali-cpu" in names and _optional.dali() is None:
        raise SystemExit("dali-cpu: NVIDIA DALI is not installed (pip install 'llp_fast[dali]')")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder) if args.folder else Path(tmp) / "jpegs"
        synthetic_jpegs(root, images=args.images, classes=args.classes, size=args.source_size)
        kw = dict(device="cpu", labeled_fraction=1.0, image_size=args.image_size, workers=args.workers, seed=0)
        # PIL's source always, as the reference DALI is checked against (with --providers dali-cpu
        # alone DALI was timed unchecked); timed only where asked for
        try:
            sources = {n: load(f"folder:{root}", loader=PROVIDERS[n], **kw) for n in dict.fromkeys(["pil", *names])}
        except DataError as e:  # (too few images a class for the held-out split: a traceback)
            p.error(f"--images {args.images} over --classes {args.classes}: {e}")
        n_img = next(iter(sources.values())).num_train
        # correctness first (also the warm-up pass of every provider)
        agreement = {}
        for kind in ("train", "eval"):
            images = {}
            for n, src in sources.items():
                make, expect = passes(src, args.batch_size, seed=0)[kind]
                images[n] = check(f"{n} {kind}", make(), expect, args.image_size)
            if "dali-cpu" in images:
                d = ((images["dali-cpu"] - images["pil"]) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()
                agreement[kind] = {
                    "vs_pil_max_levels_off_border": round(float(d[:, :, 1:-1, 1:-1].max()), 3),
                    "vs_pil_max_levels": round(float(d.max()), 3),
                    "vs_pil_mean_levels": round(float(d.mean()), 4),
                }
                print(f"{kind}: DALI vs PIL, grey levels: {agreement[kind]}", file=sys.stderr)
                inner, mean = float(d[:, :, 1:-1, 1:-1].max()), float(d.mean())
                if inner > INNER_LEVELS + 1e-3 or mean > MEAN_LEVELS:
                    raise SystemExit(
                        f"{kind}: DALI differs from PIL by {inner:.3f} grey levels off the border (bound "
                        f"{INNER_LEVELS}) and {mean:.4f} on average (bound {MEAN_LEVELS}): not timing"
                    )
        times = {(n, kind): [] for n in names for kind in ("train", "eval")}
        load_before = os.getloadavg()
        for _ in range(args.reps):
            for kind in ("train", "eval"):
                for n in names:
                    make, _ = passes(sources[n], args.batch_size, seed=0)[kind]
                    t0 = time.perf_counter()
                    got = run_pass(make)
                    times[n, kind].append(time.perf_counter() - t0)
                    assert got == n_img
        load_after = os.getloadavg()
    rows = []
    meta = {
        "images": n_img,
        "source_px": args.source_size,
        "out_px": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "host": common.cpu_name(),
        "cpu": common.cpu_info(),
        "cpus": os.cpu_count(),
        "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "commit": common.git_commit(),
        "command": common.command_line(),
        **versions(),
    }
    for (n, kind), ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "bench": "loader",
                "provider": n,
                "pass": kind,
                "median_images_per_s": round(n_img / med, 1),
                "best_images_per_s": round(n_img / min(ts), 1),
                "median_pass_s": round(med, 4),
                "reps": len(ts),
                **(agreement.get(kind, {}) if n == "dali-cpu" else {}),
                **meta,
            }
        )
    for kind in ("train", "eval"):
        line = ", ".join(f"{r['provider']} {r['median_images_per_s']:.0f} img/s" for r in rows if r["pass"] == kind)
        print(f"{kind} ({n_img} images, {args.source_size} -> {args.image_size} px, {args.workers} workers): {line}")
    name = f"loader-{common.device_slug('cpu')}.json"
    out = Path(args.out) if args.out else common.results_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"rows in {out}")
    return rows


if __name__ == "__main__":
    main()
