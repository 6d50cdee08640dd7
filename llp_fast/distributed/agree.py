"""Whether every rank of a collective call passed the same settings.

A distributed bank's methods are collective: every rank calls the same one at the same point, and
each rank's share of the answer is only right if they all passed the same ``k``, ``tau``,
``momentum``... (and built their banks from the same targets and seed). Ranks that did not ended in
gloo's abort ("collective mismatch") where the shapes differed, and in silently mixed results where
they did not (each rank's top-``k`` of another ``k`` merged; replicated copies that parted).

So each call's first collective carries the call's name and settings, as fixed-width int64s beside
what it gathers anyway (a batch's size, a refresh's round count): every rank sees every rank's row,
and on a difference every rank raises the same ``ValueError`` at the same point, none is left
waiting. Floats travel as their bits, so "the same" is exact.
"""

from __future__ import annotations

import math
import numbers
import struct
import zlib

import numpy as np
import torch
import torch.distributed as dist

WIDTH = 8  # the carried value, the call, and at most six settings


class Digest(int):
    """A setting carried as a checksum (a label vector's): shown as which ranks agree."""


_EXACT = 2**53  # whole numbers below it are exact as float64


def _is_number(value) -> bool:
    return isinstance(value, (numbers.Real, np.bool_)) and not isinstance(value, Digest)


def _code(value) -> int:
    """One setting as an int64. A number as its float64's bits, whatever its type (one rank's 1
    and another's 1.0, np.int64(10) and 10, True and 1 are the same setting; a whole number beyond
    2^53, a huge seed, as itself); a checksum (:class:`Digest`) as itself; anything else as a CRC of
    its ``str``."""
    if _is_number(value) and not (isinstance(value, numbers.Integral) and abs(int(value)) >= _EXACT):
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    if isinstance(value, numbers.Integral):
        return (int(value) + 2**63) % 2**64 - 2**63  # (wrapped into int64)
    return zlib.crc32(str(value).encode())


def _shown(code: int, like) -> str:
    """A number's code as it reads (10, 0.07; a whole number beyond 2^53, as this rank's ``like``
    is, as itself)."""
    if isinstance(like, numbers.Integral) and abs(int(like)) >= _EXACT:
        return str(code)
    x = struct.unpack("<d", struct.pack("<q", code))[0]
    if isinstance(like, (bool, np.bool_)) and x in (0, 1):
        return str(bool(x))
    return str(int(x)) if math.isfinite(x) and x.is_integer() and abs(x) < _EXACT else repr(x)


def _each(column: list[int], like) -> str:
    """Every rank's value of one setting, the same line on every rank: numbers as they read, anything
    else (a checksum, a name) as which ranks agree."""
    if _is_number(like):
        shown = [_shown(c, like) for c in column]
    else:
        shown = [f"as rank {column.index(c)}'s" if column.index(c) < r else "its own" for r, c in enumerate(column)]
    return ", ".join(f"rank {r} {v}" for r, v in enumerate(shown))


def checked(check, call: str, raw: dict, group, device):
    """``check()``, this rank's validation of the settings ``raw`` it was given, before the call's
    first collective (which carries them): where it fails, this rank still takes part in that
    collective with ``raw`` and raises what it found there. Ranks whose settings differ then all
    raise the shared ``ValueError`` (a rank alone refusing its own value left the others waiting
    out the timeout); ranks that all passed the same bad value each raise its own error."""
    try:
        return check()
    except (TypeError, ValueError):
        gather_agreed(0, call, raw, group, device)
        raise


def gather_agreed(carried: int, call: str, settings: dict, group, device) -> list[int]:
    """Every rank's ``carried`` (rank order), after checking that every rank is in ``call`` with
    the same ``settings`` (name -> int, float, bool, or anything whose ``str`` identifies it).
    One all-gather of ``WIDTH`` int64s; raises ``ValueError`` on every rank alike where they
    differ."""
    if len(settings) > WIDTH - 2:
        raise ValueError(f"at most {WIDTH - 2} settings are carried, got {len(settings)}")
    # the call with the settings' names: a rank naming another setting (a misspelt keyword) differs here
    what = f"{call}({', '.join(settings)})"
    row = [int(carried), _code(what)] + [_code(v) for v in settings.values()]
    mine = torch.tensor(row + [0] * (WIDTH - len(row)), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]
    if any(r[1] != row[1] for r in table):  # (a programming error: its traceback is kept)
        raise RuntimeError(
            f"the ranks are in different collective calls at one point, or name different settings (this rank: "
            f"{what}; {_each([t[1] for t in table], what)}): every rank calls a distributed bank's methods in the "
            "same order, with the same settings"
        )
    for j, (name, value) in enumerate(settings.items(), start=2):
        if any(r[j] != row[j] for r in table):
            each = _each([t[j] for t in table], value)
            raise ValueError(f"{call}: the ranks passed different {name} ({each}); every rank passes the same")
    return [r[0] for r in table]


def raw_digest(targets) -> Digest:
    """:func:`targets_checksum` of a label vector as a caller gave it, before any check (a list, an
    array, a tensor); a fixed value where it is no vector at all (its own check then says why)."""
    try:
        return targets_checksum(torch.as_tensor(np.asarray(targets)) if not torch.is_tensor(targets) else targets)
    except Exception:  # (anything: the caller's validation names it)
        return Digest(-1)


def where(device) -> torch.device:
    """The device of a bank given ``device``, for a collective before the bank exists: CPU where it
    names none."""
    try:
        return torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        return torch.device("cpu")


def targets_checksum(targets: torch.Tensor) -> Digest:
    """An exact int64 checksum of a label vector (position-weighted, wrapping), for
    :func:`gather_agreed`: two ranks built from different targets split one data set wrongly."""
    t = targets.long().cpu()
    return Digest(_code(int((t * torch.arange(1, t.shape[0] + 1, dtype=torch.int64)).sum()) ^ int(t.shape[0])))
