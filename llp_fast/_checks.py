"""Value checks of settings, one meaning per name, shared by the training config
(:mod:`llp_fast.train.config`), the labeller's settings (:mod:`llp_fast.embeddings.settings`) and the
command lines' flag types (:mod:`llp_fast.cli._common`). Each returns the value, normalised to its
type, or raises ``ValueError("expected ..., got ...")``; the caller names the flag or field.
(The public ops check their tensor arguments in :mod:`llp_fast._validate`.)
"""

from __future__ import annotations

import math
import numbers
import os
import re


def spec_hint(v, files: tuple[str, ...] = (".npz",)) -> str:
    """What a bare path given for a data spec was meant as: `` (this file: npz:V)`` for a name
    ending in one of ``files``, `` (this folder: folder:V)`` for a directory, else nothing (the
    training data's, the pools' and the selection's refusals say it the same way)."""
    if isinstance(v, str) and v.endswith(files):
        return f" (this file: npz:{v})"
    if isinstance(v, str) and v and os.path.isdir(v):
        return f" (this folder: folder:{v})"
    return ""


def expand_spec(spec: str) -> str:
    """``npz:PATH`` / ``folder:PATH`` with ``~`` in PATH expanded: a shell leaves ``npz:~/x`` as it
    is (it was read as ./~/x by the tools, while llp-fast-train expanded it); anything else as given."""
    for kind in ("npz:", "folder:"):
        if spec.startswith(kind):
            return kind + os.path.expanduser(spec[len(kind) :])
    return spec


def bad(what: str, value) -> ValueError:
    return ValueError(f"expected {what}, got {value!r}")


def positive_int(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise bad("a whole number >= 1", v)
    return int(v)


def count(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise bad("a whole number >= 0", v)
    return int(v)


# More threads than this is never useful, and far more (tens of thousands) crashes OpenMP or the
# BLAS inside torch when they start them (a segmentation fault, not an error).
MAX_THREADS = 1024


def threads(v):
    """A CPU thread count for torch: 0 (torch's choice) to :data:`MAX_THREADS`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= MAX_THREADS:
        raise bad(f"a whole number from 0 to {MAX_THREADS}", v)
    return int(v)


# Upper bounds of sizes a mistyped flag made into an allocation of terabytes, a hang or a swarm of
# processes (a traceback, or the out-of-memory killer, after the run directory was written).
MAX_SIDE = 8192  # a network input side, pixels
MAX_WIDTH = 4096  # a ResNet's first-stage channels
MAX_ROUNDS = 1000  # rounds of a vote
MAX_BATCH = 1 << 20  # examples in a batch
MAX_PROCESSES = 1024  # --nproc


def _whole(v, lo: int, hi: int):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
        raise bad(f"a whole number from {lo} to {hi:,}", v)
    return int(v)


def image_side(v):
    return _whole(v, 1, MAX_SIDE)


def net_width(v):
    return _whole(v, 1, MAX_WIDTH)


def rounds(v):
    return _whole(v, 1, MAX_ROUNDS)


def rounds_or_none(v):
    """0 (none) to :data:`MAX_ROUNDS`."""
    return _whole(v, 0, MAX_ROUNDS)


def batch(v):
    return _whole(v, 1, MAX_BATCH)


def extra_batch(v):
    """0 (none) to :data:`MAX_BATCH`."""
    return _whole(v, 0, MAX_BATCH)


def processes(v):
    return _whole(v, 1, MAX_PROCESSES)


def seed(v):
    """A random seed that torch and NumPy both take: 0 to 2**63 - 1."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**63:
        raise bad("a whole number from 0 to 2**63 - 1", v)
    return int(v)


def positive_float(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise bad("a finite number > 0", v)
    return float(v)


# The smallest temperature. The ops keep their float32 scores (and the difference of two) 4x inside
# float32's range, bounding a score by D * max|a| * max|b| / tau (llp_fast/_validate.scores_fit): for
# unit rows D / tau, so the smallest tau that every op takes grows with D (4 D / 3.4e38). 1e-30 covers
# every D up to 8.5e7; a tau below it failed deep inside an op, with a traceback. (Temperatures in use
# are 0.01 to 1.)
MIN_TAU = 1e-30


def temperature(v):
    """A temperature tau: a finite number, at least :data:`MIN_TAU`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= MIN_TAU):
        raise bad(f"a finite number >= {MIN_TAU:g} (the scores x . m / tau must fit float32)", v)
    return float(v)


# A week: longer waits are no use, and far longer ones (1e10 s) overflowed or wrapped inside the
# collectives' timers (a false "no answer", or a hang that nothing ended).
MAX_DIST_TIMEOUT = 7 * 86400.0


DIST_TIMEOUT_RANGE = f"a number of seconds above 0 and at most {MAX_DIST_TIMEOUT:g} (a week)"


def dist_timeout(v):
    """A collective timeout in seconds: above 0, at most :data:`MAX_DIST_TIMEOUT`."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and 0 < v <= MAX_DIST_TIMEOUT):
        raise bad(DIST_TIMEOUT_RANGE, v)
    return float(v)


def nonneg_float(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
        raise bad("a finite number >= 0", v)
    return float(v)


def fraction(v):
    """In (0, 1]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < v <= 1):
        raise bad("a number in (0, 1]", v)
    return float(v)


def unit_interval(v):
    """In [0, 1]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v <= 1):
        raise bad("a number in [0, 1]", v)
    return float(v)


def below_one(v):
    """In [0, 1): an SGD momentum (1 never forgets a gradient), a share held out (1 leaves none)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 <= v < 1):
        raise bad("a number in [0, 1)", v)
    return float(v)


def epoch_list(v):
    if not isinstance(v, (list, tuple)):
        raise bad("a list of epochs", v)
    return [count(e) for e in v]


def increasing_epochs(epochs) -> None:
    """A new run's lr drops: each once, increasing, from 1 (a drop at 0 came before any training,
    and one given twice dropped the lr 100x at once). Not a field check: runs saved before it (their
    default milestones could repeat: [1, 1] at one epoch) still resume."""
    if epochs and (any(e < 1 for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:]))):
        raise bad("increasing epochs from 1, each once", ",".join(map(str, epochs)))


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_name(v):
    if type(v).__name__ == "device" and type(v).__module__ == "torch":  # (torch.device("cpu"), as Python passes it)
        v = str(v)
    if not isinstance(v, str) or not _DEVICE.match(v):
        raise bad("cpu, cuda or cuda:N", v)
    return v


def optional(check):
    """``check`` letting ``None`` through: a setting chosen later."""

    def inner(v):
        return None if v is None else check(v)

    inner.__name__ = check.__name__
    inner.optional = True
    return inner
