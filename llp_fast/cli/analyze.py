"""``llp-fast-analyze RUN_DIR``: pictures of a training run (see :mod:`llp_fast.analyze`)."""

from __future__ import annotations

import argparse
import sys

from ..analyze import MAX_MAP_CLASSES, analyze
from . import _common


def _at_most_map_classes(v: int) -> int:
    if v > MAX_MAP_CLASSES:
        raise ValueError(f"at most {MAX_MAP_CLASSES} (one colour a class), got {v}")
    return v


_classes = _common.checked(int, lambda v: _at_most_map_classes(_common.C.positive_int(v)), "a whole number")

PROG = "llp-fast-analyze"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Pictures of a llp-fast-train run.")
    _common.add_version(ap)
    ap.add_argument("run_dir", type=_common.path, help="a llp-fast-train run directory")
    ap.add_argument(
        "--compare", type=_common.path, help="a second run (e.g. --no-density-weighting) shown beside the first"
    )
    ap.add_argument("--out", type=_common.path, help="output folder (default RUN_DIR/analysis)")
    ap.add_argument("--map", choices=("pca", "mds"), default="pca", help="2-D embedding map method (default pca)")
    ap.add_argument(
        "--classes",
        type=_classes,
        default=4,
        help=f"how many classes the embedding map shows, most populous first (default 4, at most {MAX_MAP_CLASSES})",
    )
    return ap


def _main(args) -> int:
    paths = analyze(args.run_dir, compare=args.compare, out=args.out, method=args.map, n_classes=args.classes)
    for p in paths:
        print(p)
    return 0


def main(argv=None) -> int:
    with _common.sigterm_as_interrupt():
        return _common.run(PROG, _main, _common.parse(parser().parse_args, argv))


if __name__ == "__main__":
    sys.exit(main())
