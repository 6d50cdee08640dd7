"""Optional dependencies, tried in one place.

``import llp_fast`` never fails for want of triton, CuPy, DALI or the compiled extension:
each is looked up lazily, the first time a code path asks for it, and cached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


_errors: dict[str, str] = {}  # why an optional import failed, by name


def need(module: str, extra: str, what: str):
    """``module``, imported; :class:`~llp_fast.errors.MissingExtra` (one line at the command line)
    naming the extra that brings it when it is not installed: "WHAT needs PACKAGE: pip install
    'llp_fast[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        from .errors import MissingExtra

        package = (getattr(e, "name", None) or module).split(".")[0]
        raise MissingExtra(f"{what} needs {package}: pip install 'llp_fast[{extra}]'") from None


@functools.cache
def triton():
    """The triton module, or None."""
    try:
        return importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install raising at import
        _errors["triton"] = f"{type(e).__name__}: {e}"
        return None


@functools.cache
def kernels():
    """``llp_fast.kernels`` (the Triton kernels), or None without triton.

    Installed, setup.py maps the top-level ``kernels/`` folder to ``llp_fast.kernels``.
    Run from a source checkout (``PYTHONPATH=.``, as on the GPU machine), the same folder is
    loaded under that name here.
    """
    if triton() is None or os.environ.get("LLP_FAST_DISABLE_TRITON") == "1":
        return None
    try:
        return importlib.import_module("llp_fast.kernels")
    except ModuleNotFoundError:
        init = _ROOT / "kernels" / "__init__.py"
        if not init.exists():
            _errors["kernels"] = f"no llp_fast.kernels and no {init}"
            return None
        spec = importlib.util.spec_from_file_location(
            "llp_fast.kernels", init, submodule_search_locations=[str(init.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["llp_fast.kernels"] = module
        spec.loader.exec_module(module)
        return module


def kernels_unavailable() -> str | None:
    """Why the Triton kernels cannot serve (importing them if need be), or None when they can."""
    if os.environ.get("LLP_FAST_DISABLE_TRITON") == "1":
        return "LLP_FAST_DISABLE_TRITON=1"
    if triton() is None:
        err = _errors.get("triton", "")
        return (
            "triton not installed"
            if "No module named 'triton'" in err or not err
            else f"triton failed to import: {err}"
        )
    if kernels() is None:
        return f"llp_fast.kernels failed to import: {_errors.get('kernels', 'unknown error')}"
    return None


def kernel(name: str):
    """A launcher from ``llp_fast.kernels`` by name, or None."""
    k = kernels()
    return getattr(k, name, None) if k is not None else None


@functools.cache
def cupy():
    try:
        return importlib.import_module("cupy")
    except Exception:
        return None


@functools.cache
def dali():
    try:
        return importlib.import_module("nvidia.dali")
    except Exception:
        return None
