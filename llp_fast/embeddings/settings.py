"""The knobs of labelling fixed embeddings, their defaults, and the defaults that depend on ``rounds``
or on the data's size.

``rounds = 1`` is the paper's one-shot vote exactly (docs/method.md §1.1-1.2): the labeled points'
density over the unlabeled rows, no extra weight on them. More rounds use the multi-round scheme of
docs/method.md §7, whose measured best settings differ: the density pool is every row (a
pseudo-labeled voter is itself one of the unlabeled rows, so with the unlabeled pool the original
labeled points and the pseudo-labeled voters would be measured against different pools) and the
original labeled voters count 3 times. ``density_pool="auto"`` and ``labeled_weight=None`` pick these.

The pseudo-labeled voters are capped (``max_voters="auto"``) so that the default's cost stays linear
in N: at most ``max(AUTO_VOTERS, AUTO_VOTERS_PER_LABELED * M)`` of them (M the labeled rows). The cap
is the schedule's total in place of the unlabeled rows (docs/method.md §7.4): the voters grow toward
it and the last round votes with (R - 1) / R of it. So the default is the uncapped scheme exactly
up to 20,000 unlabeled rows (the accuracy table of docs/embeddings.md is unchanged) and bounds the
work at ``O(N (M + max(20,000, 2M)))``: about 3 times ``rounds=1`` once M >= 10,000
(docs/embeddings.md, "Cost of the default"). ``rounds="auto"`` (the default) takes 20 rounds below
the cap, where a round scores only its new voters, and 10 where the cap binds, where each round
streams every row again (:meth:`Settings.rounds_for`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import _checks
from .._device import cuda_checked
from ..errors import ConfigError

DEFAULT_ROUNDS = 10  # rounds="auto" where the voter cap binds ...
UNCAPPED_ROUNDS = 20  # ... and while every unlabeled row may join the voters (docs/embeddings.md)
AUTO_VOTERS = 20_000  # the default cap on pseudo-labeled voters ...
AUTO_VOTERS_PER_LABELED = 2  # ... or twice the labeled rows, whichever is larger
MULTI_ROUND_LABELED_WEIGHT = 3.0
POOLS = ("auto", "unlabeled", "all")
TIES = ("score", "row")  # how rows of equal confidence join (docs/method.md §7.1)
SURE = 0.93  # with ties="score", a confidence at or above this joins as equally sure (docs/method.md §7.1)
DROP_QUALITY = 0.05  # drop_suspects="auto": the labels of quality below this (docs/embeddings.md, "Dropping suspects")
DROP_KEEPS = 3  # ... while their class keeps at least this many labeled rows


def _checked(name: str, check, v):
    """``check(v)`` (:mod:`llp_fast._checks`: one meaning per name), its error naming the setting."""
    try:
        return check(v)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def _int(name, v, low=1):
    return _checked(name, _checks.count if low == 0 else _checks.positive_int, v)


def _positive(name, v):
    return _checked(name, _checks.positive_float, v)


@dataclass(frozen=True)
class Settings:
    """How to label: K voters (or several, ``k=(10, 20, 100)``: one result per K), T density
    neighbours, temperature, density weighting (False: the NoDW ablation), the density pool, the
    weight of the original labeled voters, the rounds of the multi-round scheme ("auto": see
    :meth:`rounds_for`), the cap on
    pseudo-labeled voters ("auto": see the module; None: none, they grow to (R-1)/R of the unlabeled
    rows, O(N^2) work; an int: the total they grow toward, (R-1)/R of it in the last round), rows per
    streamed block, the torch device (None: where the embeddings are; cpu for files and arrays), and
    which rows of equal confidence join first in the rounds: "score" (every confidence of at least
    :data:`SURE` counts as equal; the row whose best voter scores highest, then the lower row: the
    labels do not depend on the rows' order) or "row" (exact confidences, then the lower row; the
    trainer's votes, whose measured results were run with it: docs/method.md §7.1)."""

    k: int | tuple[int, ...] = 10
    t: int = 25
    tau: float = 0.07
    density: bool = True
    density_pool: str = "auto"
    labeled_weight: float | None = None
    rounds: int | str = "auto"
    max_voters: int | str | None = "auto"
    chunk: int = 65536
    device: str | None = None
    ties: str = "score"

    def checked(self, names: dict[str, str] | None = None) -> Settings:
        """The same settings, each value checked (ConfigError naming the field, or ``names[field]``:
        the estimator's parameter names)."""
        names = names or {}

        def n(field: str) -> str:
            return names.get(field, field)

        if isinstance(self.density, np.bool_):  # a NumPy bool (a GridSearchCV grid given as an array)
            return dataclasses.replace(self, density=bool(self.density)).checked(names)

        if isinstance(self.k, (tuple, list)):
            if not self.k:
                raise ConfigError(f"{n('k')} must hold at least one number of neighbours")
            for k in self.k:
                _int(n("k"), k)
            if len(set(self.k)) != len(self.k):  # (one result per K: a dict by K)
                raise ConfigError(f"{n('k')}: each K once, got {tuple(self.k)}")
        else:
            _int(n("k"), self.k)
        _int(n("t"), self.t)
        _checked(n("tau"), _checks.temperature, self.tau)
        if isinstance(self.rounds, str) and self.rounds != "auto":
            raise ConfigError(f"{n('rounds')} must be 'auto' or a whole number >= 1, got {self.rounds!r}")
        if self.rounds != "auto":
            _int(n("rounds"), self.rounds)
        _int(n("chunk"), self.chunk)
        if not isinstance(self.density, bool):
            raise ConfigError(f"{n('density')} must be True or False, got {self.density!r}")
        if self.density_pool not in POOLS:
            raise ConfigError(f"{n('density_pool')} must be one of {', '.join(POOLS)}, got {self.density_pool!r}")
        if self.labeled_weight is not None:
            _positive(n("labeled_weight"), self.labeled_weight)
        if self.ties not in TIES:
            raise ConfigError(f"{n('ties')} must be one of {', '.join(TIES)}, got {self.ties!r}")
        if isinstance(self.max_voters, str) and self.max_voters != "auto":  # (the command line's "none" is None)
            raise ConfigError(
                f"{n('max_voters')} must be 'auto', None (no cap) or a whole number >= 0, got {self.max_voters!r}"
            )
        if self.max_voters is not None and self.max_voters != "auto":
            _int(n("max_voters"), self.max_voters, low=0)
        if self.device is None:
            return self
        device = str(self.device)  # (the trainer's rule: "cudaX" read as CUDA and "cuda:x" reached torch)
        try:
            _checks.device_name(device)
        except ValueError:
            raise ConfigError(f"{n('device')} must be cpu, cuda or cuda:N, got {self.device!r}") from None
        cuda_checked(device, "device")
        return self

    @property
    def ks(self) -> tuple[int, ...]:
        """The K (or the several K) as a tuple."""
        return tuple(int(k) for k in self.k) if isinstance(self.k, (tuple, list)) else (int(self.k),)

    def voter_cap(self, m: int, n_unlabeled: int) -> int:
        """The total of pseudo-labeled voters the rounds grow toward, for ``m`` labeled and
        ``n_unlabeled`` unlabeled rows (the last round votes with (R - 1) / R of it)."""
        if self.max_voters is None:
            return n_unlabeled
        if self.max_voters == "auto":
            return min(n_unlabeled, max(AUTO_VOTERS, AUTO_VOTERS_PER_LABELED * m))
        return min(n_unlabeled, int(self.max_voters))

    def rounds_for(self, m: int, n_unlabeled: int) -> int:
        """The rounds a run takes: those given, or for "auto" :data:`UNCAPPED_ROUNDS` while the
        voter cap does not bind (every unlabeled row may join; more rounds then cost little, each
        scoring only its new voters) and :data:`DEFAULT_ROUNDS` where it does (each round streams
        every row once more)."""
        if self.rounds != "auto":
            return int(self.rounds)
        return UNCAPPED_ROUNDS if self.voter_cap(m, n_unlabeled) >= n_unlabeled else DEFAULT_ROUNDS

    @property
    def pool(self) -> str:
        """The density pool: 'unlabeled' (the paper) for one round, 'all' rows for more."""
        if self.density_pool != "auto":
            return self.density_pool
        return "unlabeled" if self.rounds == 1 else "all"

    @property
    def weight(self) -> float:
        """The original labeled voters' weight: 1 for one round (the paper), 3 for more."""
        if self.labeled_weight is not None:
            return float(self.labeled_weight)
        return 1.0 if self.rounds == 1 else MULTI_ROUND_LABELED_WEIGHT

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)
