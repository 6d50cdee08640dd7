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

import numbers
import struct
import zlib

import numpy as np
import torch
import torch.distributed as dist

WIDTH = 8  # the carried value, the call, and at most six settings


class Digest(int):
    """A setting carried as a checksum (a label vector's): shown as which ranks agree."""


def _code(value) -> int:
    """One setting as an int64: exact for bools, ints and floats; a checksum for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, numbers.Integral):  # (NumPy's too: one rank's np.int64(10) is another's 10)
        return (int(value) + 2**63) % 2**64 - 2**63  # (wrapped into int64: a checksum, or a huge seed)
    if isinstance(value, numbers.Real):
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return zlib.crc32(str(value).encode())


def _each(column: list[int], like) -> str:
    """Every rank's value of one setting, the same line on every rank: numbers decoded as this
    rank's value is typed, anything else (a checksum, a name) as which ranks agree."""
    if isinstance(like, Digest) or not isinstance(like, (numbers.Real, np.bool_)):
        shown = [f"as rank {column.index(c)}'s" if column.index(c) < r else "its own" for r, c in enumerate(column)]
    elif isinstance(like, (bool, np.bool_)):
        shown = [str(bool(c)) for c in column]
    elif isinstance(like, numbers.Integral):
        shown = [str(c) for c in column]
    else:
        shown = [repr(struct.unpack("<d", struct.pack("<q", c))[0]) for c in column]
    return ", ".join(f"rank {r} {v}" for r, v in enumerate(shown))


def gather_agreed(carried: int, call: str, settings: dict, group, device) -> list[int]:
    """Every rank's ``carried`` (rank order), after checking that every rank is in ``call`` with
    the same ``settings`` (name -> int, float, bool, or anything whose ``str`` identifies it).
    One all-gather of ``WIDTH`` int64s; raises ``ValueError`` on every rank alike where they
    differ."""
    if len(settings) > WIDTH - 2:
        raise ValueError(f"at most {WIDTH - 2} settings are carried, got {len(settings)}")
    row = [int(carried), _code(call)] + [_code(v) for v in settings.values()]
    mine = torch.tensor(row + [0] * (WIDTH - len(row)), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]
    if any(r[1] != row[1] for r in table):  # (a programming error: its traceback is kept)
        raise RuntimeError(
            f"the ranks are in different collective calls at one point (this rank: {call}; "
            f"{_each([t[1] for t in table], call)}): every rank calls a distributed bank's methods in the same order"
        )
    for j, (name, value) in enumerate(settings.items(), start=2):
        if any(r[j] != row[j] for r in table):
            each = _each([t[j] for t in table], value)
            raise ValueError(f"{call}: the ranks passed different {name} ({each}); every rank passes the same")
    return [r[0] for r in table]


def targets_checksum(targets: torch.Tensor) -> Digest:
    """An exact int64 checksum of a label vector (position-weighted, wrapping), for
    :func:`gather_agreed`: two ranks built from different targets split one data set wrongly."""
    t = targets.long().cpu()
    return Digest(_code(int((t * torch.arange(1, t.shape[0] + 1, dtype=torch.int64)).sum()) ^ int(t.shape[0])))
