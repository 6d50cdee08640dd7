"""The flags of ``llp-fast-propagate`` (:mod:`llp_fast.cli.propagate`): their types, checked
where they parse, the two forms' rules, and the :class:`~llp_fast.embeddings.Settings` they give."""

from __future__ import annotations

import argparse
import math
import os

from .. import _files
from ..embeddings import outputs
from ..embeddings.model import model_file
from ..embeddings.settings import AUTO_VOTERS, AUTO_VOTERS_PER_LABELED, DROP_KEEPS, DROP_QUALITY, POOLS, Settings
from ..errors import ConfigError
from . import _common

PROG = "llp-fast-propagate"
DEFAULT = Settings()
# flags that set a Settings field (dest = the field); absent from the namespace unless given
SETTINGS_FLAGS = ("k", "t", "tau", "density", "density_pool", "labeled_weight", "rounds", "max_voters", "chunk")
# what only a labelling run takes (never --model)
RUN_ONLY = ("labels", "probs_out", "top", "voters_out", "suspects_out", "quality_out", "drop_suspects", "save_model")


def _device(text: str) -> str:
    device = _common.DEVICE(text)
    try:
        return _common.cuda_checked(device)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{device}: CUDA is not available on this machine") from None


def _out(text: str) -> str:
    _common.path(text)
    try:
        return outputs.check_path(text, "file")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("file ")) from None


def _model_dir(text: str) -> str:
    """``--save-model``: a directory that exists or can be made (its parent exists), or a ``.npz``
    file's path in an existing directory (:func:`model_file`)."""
    _common.path(text)
    file = model_file(text)
    if file != text and os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory (a .npz path is written as a file)")
    if os.path.lexists(file) and not os.path.isfile(file):
        raise argparse.ArgumentTypeError(f"{file} exists and is not a file: the model could not replace it")
    if why := _files.parent_problem(text):
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def _ks(text: str):
    """``--k``: auto (chosen by leave-one-out accuracy), one number of voters, or several separated
    by commas (one output per K)."""
    if text.strip().lower() == "auto":
        return "auto"
    parts = [p.strip() for p in text.split(",")]
    try:
        ks = tuple(_common.POSITIVE_INT(p) for p in parts)
    except argparse.ArgumentTypeError as e:  # (it named only numbers)
        raise argparse.ArgumentTypeError(f"{e}; or auto") from None
    if len(set(ks)) != len(ks):
        raise argparse.ArgumentTypeError(f"{text}: each K once")
    return ks[0] if len(ks) == 1 else ks


def _auto_or(read):
    """A flag's type: the word auto, or what ``read`` makes of the text (its error, with "; or auto")."""

    def parse(text: str):
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return read(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}; or auto") from None

    return parse


_tau = _auto_or(_common.TEMPERATURE)  # --tau
_rounds = _auto_or(_common.POSITIVE_INT)  # --rounds (auto, the default: docs/embeddings.md)


def _fraction(text: str) -> float:
    """A fraction in (0, 1) of the labeled rows (``--drop-suspects F``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) of the labeled rows, got {text!r}")
    return value


# --drop-suspects: auto (the labels of quality below DROP_QUALITY, while their class keeps DROP_KEEPS) or F
_drop = _auto_or(_fraction)


def _voters(text: str):
    """``--max-voters``: auto (the default: linear in N), none (no cap: O(N^2)) or a count."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        return _common.COUNT(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or auto, or none") from None


def output_name(path: str, k: int) -> str:
    """The output of K among several: ``PSEUDO.npy`` -> ``PSEUDO.k10.npy``."""
    root, ext = os.path.splitext(path)
    return f"{root}.k{k}{ext}"


def parser() -> argparse.ArgumentParser:
    d, hide = DEFAULT, argparse.SUPPRESS
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="LLP labels for precomputed embeddings: density-weighted votes of the K nearest labeled "
        "neighbours (docs/method.md §1.1-1.2), repeated over rounds in which the most confident rows join the "
        "voters (§7), streamed block by block from memory-mapped .npy files. With --model DIR: labels for new "
        "rows by a saved model (llp-fast-propagate --model DIR NEW.npy --out P.npy).",
    )
    _common.add_version(ap)
    ap.add_argument(
        "embeddings",
        type=_common.path,
        help="EMB.npy (N, D) float16/32/64, or a directory of .npy shards (in name order, part2 before part10)",
    )
    ap.add_argument(
        "labels", nargs="?", type=_common.path, default=None, help="LABELS.npy (N,) int, -1 = unlabeled (or shards)"
    )
    ap.add_argument("--out", type=_out, required=True, help="PSEUDO.npy: (N,) int64 labels (labeled rows keep theirs)")
    ap.add_argument("--confidence-out", type=_out, default=None, help="(N,) float32 confidences (1 on labeled rows)")
    ap.add_argument(
        "--probs-out",
        type=_out,
        default=None,
        help="PROBS.npz: 'classes' (N, P) int64 and 'probs' (N, P) float32, each row's --top most likely classes",
    )
    ap.add_argument(
        "--top",
        type=_common.POSITIVE_INT,
        default=None,
        help="P for --probs-out (default 3); a row's classes that got no share of its vote, and any beyond the "
        "classes there are, read class -1 with probability 0",
    )
    ap.add_argument("--voters-out", type=_out, default=None, help="(N, K) int64 rows that voted (-1: none)")
    ap.add_argument(
        "--suspects-out",
        type=_out,
        default=None,
        help="S.npy: (M,) int64 the labeled rows, most suspect label first (docs/embeddings.md, 'Suspect labels')",
    )
    ap.add_argument("--quality-out", type=_out, default=None, help="(N,) float64 label quality (NaN: unlabeled)")
    ap.add_argument(
        "--drop-suspects",
        type=_drop,
        default=None,
        metavar="auto|F",
        help="label again without the most suspect labels (they are labeled by the vote): auto, those of quality "
        f"below {DROP_QUALITY:g} while their class keeps at least {DROP_KEEPS} labeled rows, or the most suspect "
        "fraction F of the labeled rows (rows that show no sign of a wrong label, quality 1, are kept); "
        "--suspects-out and --quality-out then hold the first labelling's ranking, the one the drop was chosen "
        "by, and the other outputs the second's (docs/embeddings.md, 'Dropping suspects')",
    )
    ap.add_argument(
        "--min-confidence",
        type=_common.UNIT,
        default=None,
        metavar="C",
        help="write -1 for rows whose confidence is below C (labeled rows keep theirs); saved with --save-model, "
        "where --model applies it unless given again",
    )
    ap.add_argument(
        "--save-model",
        type=_model_dir,
        default=None,
        metavar="DIR",
        help="write DIR/model.npz (or the file itself, where DIR ends in .npz), for --model",
    )
    ap.add_argument(
        "--model", type=_common.path, default=None, metavar="DIR", help="label EMBEDDINGS (new rows) by a saved model"
    )
    ap.add_argument(
        "--k",
        type=_ks,
        default=hide,
        help=f"voters per row (default {d.k}; at most the voters); auto: chosen from 5, 10, 20, 50 by leave-one-out "
        "accuracy of the labeled rows; several, --k 10,20,100: one output per K (OUT.k10.npy, ...), from one "
        "selection of the largest K with --rounds 1",
    )
    ap.add_argument(
        "--t",
        type=_common.POSITIVE_INT,
        default=hide,
        help=f"density neighbours (default {d.t}; at most the density pool's rows)",
    )
    ap.add_argument("--tau", type=_tau, default=hide, help=f"temperature (default {d.tau}); auto: as --k auto")
    ap.add_argument(
        "--rounds",
        type=_rounds,
        default=hide,
        help="rounds of the vote (default auto: 20 while every unlabeled row can become a voter, 10 where "
        "--max-voters caps them; 1 = the paper's one-shot vote)",
    )
    ap.add_argument(
        "--max-voters",
        type=_voters,
        default=hide,
        help=f"cap on pseudo-labeled voters, the total the rounds grow toward (the last round votes with "
        f"(R-1)/R of it): auto (default: max({AUTO_VOTERS:,}, {AUTO_VOTERS_PER_LABELED} x the labeled rows), so the "
        "cost stays linear in N), none (the unlabeled rows: O(N^2) at large N) or a count (each class's share "
        "of it is rounded, so the voters may exceed it by up to half a voter a class)",
    )
    ap.add_argument(
        "--density-pool", choices=POOLS, default=hide, help="auto (default): unlabeled rows for one round, all for more"
    )
    ap.add_argument(
        "--labeled-weight",
        type=_common.POSITIVE_FLOAT,
        default=hide,
        help="weight of the labeled voters (default: 1 for one round, 3 for more)",
    )
    ap.add_argument(
        "--no-density-weighting",
        dest="density",
        action="store_const",
        const=False,
        default=hide,
        help="the NoDW ablation: plain weighted kNN",
    )
    ap.add_argument("--no-normalize", dest="normalize", action="store_false", help="embeddings are already unit rows")
    ap.add_argument("--chunk", type=_common.POSITIVE_INT, default=hide, help=f"rows per block (default {d.chunk})")
    ap.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N (Triton kernels)")
    ap.add_argument("--threads", type=_common.THREADS, default=None, help="CPU threads (default or 0: torch's choice)")
    ap.add_argument("--nproc", type=_common.PROCESSES, default=1, help="run as P local processes (gloo/NCCL)")
    ap.add_argument("--dist-timeout", type=_common.DIST_TIMEOUT, metavar="SECONDS", help=_common.DIST_TIMEOUT_HELP)
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    return ap


OUTPUT_FLAGS = ("out", "confidence_out", "probs_out", "voters_out", "suspects_out", "quality_out")


def _flag(name: str) -> str:
    """The flag of a namespace entry."""
    special = {"density": "--no-density-weighting", "normalize": "--no-normalize"}
    return special.get(name, "--" + name.replace("_", "-"))


def _check_model_form(ap, args) -> None:
    """``--model DIR NEW --out P``: one input, and none of a labelling run's knobs."""
    if args.labels is not None:
        ap.error(f"--model labels {args.embeddings} by the saved model: give no LABELS ({args.labels})")
    why = "the model's settings are used"
    given = [(f, why) for f in SETTINGS_FLAGS if f != "chunk" and hasattr(args, f)]
    only = "a labelling run's option: --model writes --out and --confidence-out only"
    given += [(f, only) for f in RUN_ONLY[1:] if getattr(args, f)]
    given += [("normalize", why)] * (not args.normalize)
    given += [("nproc", "it labels new rows in one process, streamed")] * (args.nproc > 1)
    if given:
        ap.error(f"argument {_flag(given[0][0])}: not with --model ({given[0][1]})")


def parse(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_intermixed_args(argv)  # LABELS may follow the flags
    if args.model is not None:
        _check_model_form(ap, args)
    elif args.labels is None:
        ap.error("the following arguments are required: labels (or --model DIR to label new rows)")
    if args.probs_out and not args.probs_out.endswith(".npz"):  # (an .npz archive was written under any name)
        ap.error(f"argument --probs-out: an .npz archive (classes and probs); name it .npz, got {args.probs_out}")
    if args.top is not None and not args.probs_out:  # (it was ignored without a word)
        ap.error("argument --top: the number of classes --probs-out writes; give --probs-out too")
    ks = getattr(args, "k", DEFAULT.k)
    if isinstance(ks, tuple) and (args.drop_suspects or args.save_model):
        ap.error(
            f"argument {'--drop-suspects' if args.drop_suspects else '--save-model'}: needs one K, not "
            f"--k {','.join(map(str, ks))}"
        )
    if isinstance(ks, tuple) and getattr(args, "tau", None) == "auto":
        ap.error(f"argument --tau: auto chooses tau for one K, not for --k {','.join(map(str, ks))}")
    outs = {}
    for f in OUTPUT_FLAGS:
        path = getattr(args, f)
        for k in ks if isinstance(ks, tuple) else (None,):
            flag = _flag(f) + ("" if k is None else f" (K = {k})")
            outs[flag] = path if path is None or k is None else output_name(path, k)
    if args.save_model:  # the model's directory and file are outputs too
        outs["--save-model"] = args.save_model
        if model_file(args.save_model) != args.save_model:
            outs["--save-model's file"] = model_file(args.save_model)
    inputs = {"EMBEDDINGS": args.embeddings, **({"LABELS": args.labels} if args.labels else {})}
    if args.model is not None:
        inputs["--model"] = model_file(args.model)
    try:
        outputs.check_distinct(outs, inputs)
    except ConfigError as e:
        ap.error(str(e))
    return args


def settings_of(args) -> Settings:
    """The flags given, over :class:`Settings`' defaults ("auto" K or tau stands at the default)."""
    given = {f: getattr(args, f) for f in SETTINGS_FLAGS if hasattr(args, f)}
    for f in ("k", "tau"):
        if given.get(f) == "auto":
            del given[f]
    return Settings(**given, device=args.device)
