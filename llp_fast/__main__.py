"""``python -m llp_fast``: what this installation is and what it runs on, for a bug report.

Prints the package's, Python's and torch's versions, the machine (CPU model and cores, GPU), which
implementation serves each op on each device and why (``llp_fast.backends()``), the paths the CPU
kernels take here (docs/method.md §4), and which optional extras are installed (README "Two
commands"). Reading it loads the compiled extension, as the first op call would; it trains nothing
and writes nothing. ``--help`` says this, ``--version`` gives the version alone; any other argument
is an error.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _extras() -> list[str]:
    """One entry per extra of the package's metadata: installed (with versions) or what to run."""
    try:
        requires = importlib.metadata.requires("llp_fast") or []
    except importlib.metadata.PackageNotFoundError:
        return ["unknown (llp_fast is not installed as a package here: run from a source checkout?)"]
    wanted: dict[str, list[str]] = {}
    for req in requires:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+).*extra\s*==\s*[\"']([^\"']+)[\"']", req)
        if m and m.group(2) != "dev":
            wanted.setdefault(m.group(2), []).append(m.group(1))
    out = []
    for extra, dists in wanted.items():
        have, missing = [], []
        for dist in dict.fromkeys(dists):
            try:
                have.append(f"{dist} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                missing.append(dist)
        if missing:
            out.append(f"{extra}: missing {', '.join(missing)} (pip install 'llp_fast[{extra}]')")
        else:
            out.append(f"{extra}: {', '.join(have)}")
    return out


def report() -> list[str]:
    """The lines ``python -m llp_fast`` prints."""
    import torch

    import llp_fast
    from llp_fast import _ext, _optional
    from llp_fast.ops import describe_backends

    lines = [
        f"llp_fast {llp_fast.__version__} ({os.path.dirname(os.path.abspath(llp_fast.__file__))})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), {torch.get_num_threads()} CPU threads",
        f"cpu: {_cpu_model()}, {os.cpu_count()} logical cores",
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"gpu: {', '.join(names)}")
    else:
        lines.append("gpu: none (torch sees no CUDA device)")
    module = _ext.load()
    if module is None:
        lines.append(f"extension: not loaded ({_ext.unavailable()})")
    else:
        lines.append(f"extension: {_ext.describe()}, built against torch {getattr(module, 'torch_version', '?')}")
    triton = _optional.triton()
    lines.append(
        f"triton: {triton.__version__}" if triton is not None else f"triton: {_optional.kernels_unavailable()}"
    )
    lines.append(describe_backends())
    lines.extend(f"extra {e}" for e in _extras())
    return lines


def main(argv: list[str] | None = None) -> int:
    from .cli._output import guarded

    with guarded():  # (`python -m llp_fast -h | head -1`: a BrokenPipeError traceback)
        return _main(sys.argv[1:] if argv is None else argv)


def _main(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if args == ["--version"]:  # (every tool's --version points here)
        from . import __version__

        print(f"llp_fast {__version__}")
        return 0
    if args:
        print(
            f"python -m llp_fast: error: no arguments expected, got {' '.join(args)!r} (--help says why)",
            file=sys.stderr,
        )
        return 2
    try:
        print("\n".join(report()))
    except ValueError as e:  # a LLP_FAST_* setting that names nothing
        print(f"python -m llp_fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
