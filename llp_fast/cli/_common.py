"""What every command shares: flag types that check where they parse, one way to fail, and the
``--nproc P`` relaunch under torchrun.

A flag's value is checked by its argparse ``type`` (the same range checks as the training config,
:mod:`llp_fast.train.config`), so a bad value is argparse's usage error naming the flag. Errors the
user can fix later on (:func:`llp_fast.errors.is_user_error`) print ``PROG: error: <one line>``
and exit 2; an interrupt exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from ..errors import ConfigError, Interrupted, is_user_error, one_line
from ..train import config as C


def checked(parse, check, what: str | None = None):
    """An argparse ``type``: ``check(parse(text))``, the error text as argparse's message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or parse.__name__}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def epochs(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None
    return C.epoch_list(values)


POSITIVE_INT = checked(int, C.positive_int, "a whole number")
COUNT = checked(int, C.count, "a whole number")
POSITIVE_FLOAT = checked(float, C.positive_float, "a number")
NONNEG_FLOAT = checked(float, C.nonneg_float, "a number")
FRACTION = checked(float, C.fraction, "a number")
UNIT = checked(float, C.unit_interval, "a number")
MOMENTUM = checked(float, C.momentum_range, "a number")
DEVICE = checked(str, C.device_name, "a device")


def cuda_checked(device: str) -> str:
    """``device``, or :class:`ConfigError` when it names CUDA on a machine without a GPU."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


def run(prog: str, body, *args, interrupted: str = "interrupted; nothing was written") -> int:
    """``body(*args)`` with the tools' error contract; returns the exit status. ``interrupted``:
    the line for Ctrl-C (a run that checkpointed raises :class:`Interrupted` instead)."""
    try:
        return body(*args)
    except Interrupted as e:
        print(f"{prog}: {e}; continue with: {prog} --resume {e.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun(nproc: int, module: str, argv: list[str]) -> int:
    """``python -m module argv`` (``--nproc`` dropped) under torch.distributed.run, P local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*cmd, "-m", module, *without_nproc(argv)])
