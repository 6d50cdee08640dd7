"""``llp-fast-propagate``: LLP labels for precomputed embeddings, streamed from ``.npy`` files
(docs/method.md §1.1-1.2; more than one round: §7). The work is :mod:`llp_fast.embeddings`'s; this
module parses and checks the flags, runs it (alone, under torchrun, or ``--nproc P`` local
processes) and writes the outputs atomically.

Two forms: ``EMB LABELS --out P`` labels the unlabeled rows (and can rank suspect labels, choose K
and tau, abstain, save the voters as a model); ``--model DIR NEW --out P`` labels new rows with a
saved model. The labelling knobs and their defaults are :class:`~llp_fast.embeddings.Settings`'
(a flag not given takes the dataclass's default).
"""

from __future__ import annotations

import os
import sys
import time

from .. import distributed
from ..embeddings import outputs
from ..errors import ConfigError, DataError
from . import _common
from .propagate_args import DEFAULT, PROG, output_name, parse, settings_of


def _cost_note(progress, n: int, m: int, settings) -> None:
    """One line when more than one round will cost far more than the one-shot vote: without a cap
    (--max-voters none) the voters grow toward N and the work is quadratic in N (docs/embeddings.md)."""
    rounds = settings.rounds_for(m, n - m)
    if rounds < 2 or n < 100_000:
        return
    voters = m + settings.voter_cap(m, n - m) * (rounds - 1) // rounds
    ratio = voters / max(m, 1)
    if ratio >= 20:
        progress.line(
            f"{rounds} rounds on {n:,} rows: about {ratio:,.0f}x the work of --rounds 1 (the voters grow to "
            f"{voters:,}); --rounds 1 or --max-voters auto bound it"
        )


def _drop_note(asked, m: int, labels, used, dropped, ranked) -> str:
    """What ``--drop-suspects`` did, for the summary line."""
    import numpy as np

    from ..embeddings import suspects
    from ..embeddings.settings import DROP_KEEPS, DROP_QUALITY

    if asked == "auto":
        flagged = ranked.below_cut()
        keeps = f"a class keeps at least {DROP_KEEPS} of its labeled rows"
        if not flagged:  # the first run stands
            return f" (--drop-suspects auto: no label's quality is below {DROP_QUALITY:g}, none dropped)"
        if not len(dropped):
            return f" (--drop-suspects auto: {_below_cut(flagged)}, none dropped: {keeps})"
        note = f" ({_labels(len(dropped))}, quality below {DROP_QUALITY:g}, dropped and labeled again"
        if flagged > len(dropped):
            note += f"; {flagged - len(dropped)} more below it kept: {keeps}"
    else:
        n = suspects.drops_asked(asked, m)
        if not n:  # round(F * M) = 0: nothing to drop, the first run stands
            return f" (--drop-suspects {asked:g} of {m} labeled rows rounds to none: nothing dropped)"
        if not len(dropped):  # no labeled row is flagged: the first run stands
            return f" (--drop-suspects {asked:g}: no labeled row shows a sign of a wrong label, none dropped)"
        note = f" ({_labels(len(dropped))} dropped and labeled again"
        if len(dropped) < n:
            note += f"; the other {n - len(dropped)} of the {n} asked show no sign of a wrong label: kept"
    gone = np.setdiff1d(np.unique(labels[labels >= 0]), used[used >= 0])
    if len(gone):  # their every labeled row was a suspect: no vote can give them now
        note += f"; no labeled row left of class{'es' if len(gone) > 1 else ''} {', '.join(map(str, gone))}"
    return note + ")"


def _labels(n: int) -> str:
    return f"{n} suspect label{'s' if n > 1 else ''}"


def _below_cut(n: int) -> str:
    from ..embeddings.settings import DROP_QUALITY

    return f"{n} label{'s' if n > 1 else ''} of quality below {DROP_QUALITY:g}"


def _low_note(labels, ranked) -> str:
    """How many labels are below ``--drop-suspects auto``'s cut, where the suspects were asked for
    without it (about as many as were wrong where labels were flipped: docs/embeddings.md), and how
    many of them it would drop (a class keeps ``DROP_KEEPS`` of its labeled rows)."""
    from ..embeddings import suspects
    from ..embeddings.settings import DROP_KEEPS

    low = ranked.below_cut()
    if not low:
        return ""
    would = len(suspects.drop_worst(labels, ranked, "auto")[1])
    if would == low:
        return f" ({_below_cut(low)}: --drop-suspects auto drops {'it' if low == 1 else 'them'})"
    return (
        f" ({_below_cut(low)}: --drop-suspects auto drops {f'{would} of them' if would else 'none'}, "
        f"as a class keeps at least {DROP_KEEPS} of its labeled rows)"
    )


def _label(args) -> int:
    """The labelling run: EMB LABELS -> labels (and the optional outputs)."""
    import time

    import numpy as np
    import torch

    from .._progress import Progress
    from ..embeddings import Engine, Rows, model, read_labels, suspects, tune
    from ..embeddings.ranks import Local, Ranks

    comm, rank = Local(), 0
    settings = settings_of(args)
    if distributed.launched():
        cuda = args.device.startswith("cuda")
        if cuda and torch.cuda.is_available():  # (each rank its own GPU: NCCL and Triton take the current one)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        rank, _ = distributed.init("nccl" if cuda else "gloo")
        if cuda:
            settings = settings.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        comm = Ranks(torch.device(settings.device))
    progress = Progress(enabled=not args.quiet and rank == 0, prog=PROG)
    t0 = time.perf_counter()
    rows = Rows(args.embeddings, normalize=args.normalize)
    labels = read_labels(args.labels, rows.n)
    n, m = rows.n, int((labels >= 0).sum())
    if m == 0:  # (before anything that would say something else first)
        raise DataError(f"labels {args.labels} hold no labeled row (no entry >= 0)")
    if args.drop_suspects not in (None, "auto") and suspects.drops_asked(args.drop_suspects, m) >= m:
        raise ConfigError(
            f"--drop-suspects {args.drop_suspects:g}: would drop all {m} labeled rows of {args.labels}; give a "
            "smaller fraction"
        )
    auto_k, auto_tau = getattr(args, "k", None) == "auto", getattr(args, "tau", None) == "auto"
    if auto_k or auto_tau:
        choice = tune.choose(rows, labels, settings.checked(), auto_k=auto_k, auto_tau=auto_tau, comm=comm)
        settings = settings.replace(k=choice.k, tau=choice.tau)  # what is not chosen, choose keeps
        if rank == 0:
            print(f"{PROG}: {choice.line(auto_k, auto_tau)}", flush=True)
    _cost_note(progress, n, m, settings)
    extras = {"top_classes": (args.top or 3) if args.probs_out else 0, "voter_ids": bool(args.voters_out)}
    results = Engine(rows, labels, settings, comm=comm, progress=progress).run(**extras)
    results = results if isinstance(results, dict) else {None: results}
    ranked, used, note = {}, labels, ""
    if args.suspects_out or args.quality_out or args.drop_suspects:
        for k, result in results.items():
            ranked[k] = suspects.suspects_of(rows, labels, result, settings, comm=comm, progress=progress)
    if args.drop_suspects:
        used, dropped = suspects.drop_worst(labels, ranked[None], args.drop_suspects)
        if len(dropped):
            results = {None: Engine(rows, used, settings, comm=comm, progress=progress).run(**extras)}
        note = _drop_note(args.drop_suspects, m, labels, used, dropped, ranked[None])
        m = int((used >= 0).sum())
    elif None in ranked:  # the suspects asked for alone: how many labels the data contradict outright
        note = _low_note(labels, ranked[None])
    if rank == 0:
        files, written, abstained = {}, [], {}
        for k, result in results.items():

            def name(path, k=k):
                return path if k is None else output_name(path, k)

            out = result.labels.astype(labels.dtype)
            if args.min_confidence is not None:
                low = (result.confidence < args.min_confidence) & (used < 0)
                out[low] = -1
                abstained[k] = int(low.sum())
            files[name(args.out)] = ("npy", out)
            if args.confidence_out:
                files[name(args.confidence_out)] = ("npy", result.confidence)
            if args.probs_out:
                files[name(args.probs_out)] = ("npz", {"classes": result.top_classes, "probs": result.top_probs})
            if args.voters_out:
                files[name(args.voters_out)] = ("npy", result.voters)
            if args.suspects_out:
                files[name(args.suspects_out)] = ("npy", ranked[k].rows.astype(np.int64))
            if args.quality_out:
                files[name(args.quality_out)] = ("npy", ranked[k].per_row(n))
        result = next(iter(results.values()))
        written.extend(files)

        def save_model(stack):  # with the outputs: all of them move into place, or none
            written.append(
                model.save(
                    args.save_model,
                    rows,
                    result,
                    k=result.k,
                    tau=settings.tau,
                    normalize=args.normalize,
                    min_confidence=args.min_confidence,
                    stack=stack,
                )
            )

        outputs.write(files, also=save_model if args.save_model else None)
        rounds = f", {result.rounds_run} round{'s' if result.rounds_run != 1 else ''}"
        if None not in results:
            rounds += ", K = " + ", ".join(str(k) for k in results)
        head = f"labeled {n - m} of {n} rows"
        if abstained:  # --min-confidence: those rows are -1, not labelled
            c = f"confidence below {args.min_confidence:g}"
            if len(set(abstained.values())) == 1:
                a = next(iter(abstained.values()))
                head = f"labeled {n - m - a} of {n} rows ({a} left -1, {c})"
            else:
                each = ", ".join(f"{a} at K = {k}" for k, a in abstained.items())
                head += f" less those left -1, {c} ({each})"
        took = f"in {time.perf_counter() - t0:.2f} s"
        print(f"{PROG}: {head} from {m} labeled rows{rounds}{note} {took} -> {', '.join(written)}")
    return 0


def _apply(args) -> int:
    """``--model DIR NEW --out P``: new rows labeled by a saved model, block by block."""
    import time

    from .._progress import Progress
    from ..embeddings import model

    t0 = time.perf_counter()
    threshold = "model" if args.min_confidence is None else args.min_confidence
    labels, conf, saved = model.label_file(
        args.model,
        args.embeddings,
        chunk=getattr(args, "chunk", DEFAULT.chunk),
        device=args.device,
        progress=Progress(enabled=not args.quiet, prog=PROG),
        min_confidence=threshold,
    )
    files = {args.out: ("npy", labels)}
    if args.confidence_out:
        files[args.confidence_out] = ("npy", conf)
    outputs.write(files)
    head = f"labeled {len(labels)} rows"
    abstained = int((labels == -1).sum())
    if abstained:  # (as the labelling run's line: those rows are -1, not labelled)
        c = saved.min_confidence if threshold == "model" else threshold
        head = f"labeled {len(labels) - abstained} of {len(labels)} rows ({abstained} left -1, confidence below {c:g})"
    print(
        f"{PROG}: {head} by the {saved.voters.shape[0]} voters of {args.model} "
        f"in {time.perf_counter() - t0:.2f} s -> {', '.join(files)}"
    )
    return 0


def _run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return _apply(args) if args.model is not None else _label(args)


def _relaunch(args, argv) -> int:
    """``--nproc P``: the same command as P local processes; a lost rank is one line (nothing is
    written: rank 0 writes the outputs at the end, atomically; a rank lost at the last meeting, once
    they are in place, is said so: "nothing was written" stood beside outputs it had replaced)."""
    start = time.time()
    ks = args.k if isinstance(getattr(args, "k", None), tuple) else (None,)
    names = ("out", "confidence_out", "probs_out", "voters_out", "suspects_out", "quality_out")
    asked = [getattr(args, a, None) for a in names]
    paths = [p if k is None else output_name(p, k) for p in asked if p for k in ks]
    if getattr(args, "save_model", None):
        from ..embeddings.model import model_file

        paths.append(model_file(args.save_model))

    def kept() -> str:
        new = [p for p in paths if os.path.isfile(p) and os.path.getmtime(p) >= start - 1]
        return f"the outputs were written before it ({', '.join(new)})" if new else "nothing was written"

    return _common.torchrun(args.nproc, "llp_fast.cli.propagate", argv, prog=PROG, kept=kept)


def main(argv=None) -> int:
    """``llp-fast-propagate EMB.npy LABELS.npy --out PSEUDO.npy`` or ``--model DIR NEW.npy --out P.npy``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _common.parse(parse, argv)
    _common.set_dist_timeout(args.dist_timeout)
    if args.nproc > 1 and not distributed.launched():
        return _common.run(PROG, _relaunch, args, argv)
    # SIGINT raises Terminated too, not KeyboardInterrupt (see sigterm_as_interrupt)
    with _common.sigterm_as_interrupt(sigint=True):
        return distributed.finish(_common.run(PROG, _run, args))


if __name__ == "__main__":
    sys.exit(main())
