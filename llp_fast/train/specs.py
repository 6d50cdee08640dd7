"""The range checks of a run's paths and names (``--data``, ``--run-dir``, ``--init-weights``,
``--arch``): each returns the value it accepts, or raises ``ValueError`` saying what it expected
(:mod:`llp_fast.train.config` names the flag)."""

from __future__ import annotations

import os
import re

from .._checks import bad, expand_spec, spec_hint

ARCHS = ("resnet18", "resnet50")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:factory, given:ClassName


def data_spec(v):
    if not isinstance(v, str) or not (v in ("digits", "mnist5k") or v.startswith(("npz:", "folder:"))):
        # (a bare path was "expected ..., got 'my.npz'")
        raise ValueError(f"expected digits, mnist5k, npz:PATH or folder:PATH, got {v!r}{spec_hint(v)}")
    if v in ("npz:", "folder:"):  # (the current directory was read as the file: "no such file: /cwd")
        raise bad(f"{v}PATH with a PATH", v)
    return expand_spec(v)


def run_dir_path(v):
    if isinstance(v, str) and not v.strip():  # (an empty one silently became runs/<time>)
        raise bad("a directory path (leave it out for runs/<time>)", v)
    if isinstance(v, (str, os.PathLike)) and os.path.exists(v) and not os.path.isdir(v):  # ("File exists")
        raise ValueError(f"{os.fspath(v)} is a file, not a run directory")
    return file_path(v)


def file_path(v):
    """A path as a string (a path object kept its type into config.json: a JSON TypeError)."""
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v:
        raise bad("a path", v)
    return v


def arch_spec(v):
    # "given:" + the class's __qualname__ of a backbone passed in Python (a class defined in a
    # function has "<locals>" in it)
    if isinstance(v, str) and v.startswith("given:") and len(v) > len("given:"):
        return v
    if not isinstance(v, str) or not (v in ARCHS or _FACTORY.match(v)):
        raise bad("resnet18, resnet50 or package.module:factory", v)
    return v
