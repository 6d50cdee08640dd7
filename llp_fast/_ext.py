"""The compiled extension (``csrc/``): found or built once, on first use.

Loading the shared object registers its kernels with ``TORCH_LIBRARY_IMPL`` for the ops declared
in :mod:`llp_fast.ops` (which ops, on which device: the ``extension`` column of the op table,
``llp_fast._op_table``); nothing is called through the Python module itself. :func:`load` tries, in order:

1. ``llp_fast._C`` built by ``setup.py`` (``pip install -e .`` or ``build_ext --inplace``), when it
   was built against this torch (checked from the file, before loading: loading registers kernels,
   which cannot be undone) and has CUDA kernels if this process could use them;
2. a JIT build with :func:`torch.utils.cpp_extension.load` (ninja) into ``$LLP_FAST_CACHE`` or
   ``~/.cache/llp_fast/<torch version>``: how the extension runs from a source checkout, e.g. on
   the GPU machine. CUDA sources are included when a GPU is visible and ``CUDA_HOME`` is set;
3. otherwise it warns once and returns None: the ops' default bodies (the reference) serve.

``LLP_FAST_DISABLE_EXT=1`` skips all of it; ``LLP_FAST_EXT_JIT=1`` ignores a prebuilt ``llp_fast._C``
(JIT only); ``LLP_FAST_VERBOSE_BUILD=1`` shows the compiler's output. This module imports torch
lazily so that ``setup.py`` can read the source list and flags from it without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import threading
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CPU_SOURCES = (
    "bindings.cpp",
    "cpu/aggregation_loss_cpu.cpp",
    "cpu/bank_update_cpu.cpp",
    "cpu/scan_f32.cpp",
    "cpu/tile_f32.cpp",
    "cpu/topk_scores_cpu.cpp",
    "cpu/vote_cpu.cpp",
)
CUDA_SOURCES = ("cuda/bank_update_cuda.cu",)
HEADERS = ("llp_fast.h", "cpu/topk.h", "cpu/left_pack.h")

_MARKER = re.compile(rb"llp_fast-build:torch=([^;\x00]*);cuda=([01]);")


# ---------------------------------------------------------------------------------------------
# Build description, shared with setup.py (which loads this file without importing llp_fast).


def sources(cuda: bool, root: Path = CSRC) -> list[str]:
    """The source files of the extension, with the .cu files when ``cuda``."""
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else ())
    return [str(root / n) for n in names]


def cxx_flags(cuda: bool) -> list[str]:
    # -fopenmp: at::parallel_for is an inline template around `#pragma omp parallel`; without it the
    # kernels compile to a serial loop. The OpenMP runtime resolves to the libgomp torch loaded.
    # -ffp-contract=off: a multiply and an add round separately, as the reference's mul_ and add_ (the
    # AVX2 and AVX-512 variants of csrc/cpu/scan_f32.cpp would otherwise fuse them). No -march: the
    # object runs on any x86-64; the scan that gains from a wider instruction set is compiled once per
    # set (target attributes) and chosen at run time by the CPU's features.
    flags = ["-O3", "-ffp-contract=off"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    if cuda:
        flags.append("-DLLP_FAST_WITH_CUDA")
    return flags


def nvcc_flags() -> list[str]:
    # No --use_fast_math: the kernel divides and takes sqrt as the reference does.
    return ["-O3", "-DLLP_FAST_WITH_CUDA"]


def ld_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cuda_wanted() -> bool:
    """Whether this process would use CUDA kernels: a visible GPU and a CUDA toolkit."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("LLP_FAST_FORCE_CPU") == "1":
        return False
    return bool(torch.version.cuda) and CUDA_HOME is not None and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Loading.

_lock = threading.Lock()
_loaded = False
_module = None
_warned = False
_failure = ""  # why the last load found no extension


def disabled() -> bool:
    return os.environ.get("LLP_FAST_DISABLE_EXT") == "1"


def build_info(path: str | os.PathLike) -> tuple[str, bool] | None:
    """(torch version, has CUDA kernels) that a built object was compiled with, read from its bytes
    (the ``llp_fast_build_info`` string of csrc/bindings.cpp), or None if it has no such string."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    m = _MARKER.search(data)
    return (m.group(1).decode(), m.group(2) == b"1") if m else None


def _torch_base_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _prebuilt_path() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("llp_fast._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _import_prebuilt():
    return importlib.import_module("llp_fast._C")


def _cache_dir() -> Path:
    import torch

    base = os.environ.get("LLP_FAST_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "llp_fast" / torch.__version__


def _stamp(cuda: bool) -> str:
    """A digest of what the JIT build depends on: sources, flags, torch."""
    import torch

    h = hashlib.sha256()
    for f in sources(cuda) + [str(CSRC / n) for n in HEADERS]:
        h.update(Path(f).read_bytes())
    h.update(repr((cxx_flags(cuda), nvcc_flags(), ld_flags(), torch.__version__, cuda)).encode())
    return h.hexdigest()


def _jit_build(cuda: bool):
    import torch  # noqa: F401
    from torch.utils import cpp_extension

    name = "llp_fast_C_cuda" if cuda else "llp_fast_C"
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp_file = build_dir / "llp_fast.stamp"
    stamp = _stamp(cuda)
    if not stamp_file.exists() or stamp_file.read_text() != stamp:
        print(
            f"llp_fast: building the C++{'/CUDA' if cuda else ''} extension in {build_dir} "
            "(first use; a minute or two, then cached)",
            file=sys.stderr,
            flush=True,
        )
    module = cpp_extension.load(
        name=name,
        sources=sources(cuda),
        extra_cflags=cxx_flags(cuda),
        extra_cuda_cflags=nvcc_flags(),
        extra_ldflags=ld_flags(),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=os.environ.get("LLP_FAST_VERBOSE_BUILD") == "1",
    )
    stamp_file.write_text(stamp)
    return module


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _load():
    global _failure
    want_cuda = cuda_wanted()
    prebuilt = None if os.environ.get("LLP_FAST_EXT_JIT") == "1" else _prebuilt_path()
    usable = None  # a prebuilt object for this torch, even if it lacks wanted CUDA kernels
    if prebuilt is not None:
        info = build_info(prebuilt)
        if info is not None and info[0] == _torch_base_version():
            usable = prebuilt
            if info[1] or not want_cuda:
                try:
                    return _import_prebuilt()
                except (ImportError, OSError):  # e.g. undefined symbol: another torch's ABI
                    usable = None
    errors = []
    # With a usable CPU-only prebuilt object, only a CUDA build is worth compiling; it is the
    # fallback if that fails. Otherwise a CUDA build (when wanted), then a CPU build.
    attempts = (True,) if usable is not None else ((True, False) if want_cuda else (False,))
    for cuda in attempts:
        try:
            return _jit_build(cuda)
        except Exception as e:  # compiler, ninja or toolkit missing, or a build error
            errors.append(f"{'CUDA' if cuda else 'CPU'} build: {type(e).__name__}: {str(e).strip()[-400:]}")
    if usable is not None:  # built for this torch, only without the CUDA kernels
        try:
            return _import_prebuilt()
        except (ImportError, OSError) as e:
            errors.append(f"prebuilt llp_fast._C: {e}")
    _failure = " | ".join(errors)
    _warn_once(
        "llp_fast: the C++ extension is unavailable, the pure-PyTorch reference serves instead "
        f"(set LLP_FAST_DISABLE_EXT=1 to skip it). {' | '.join(errors)}"
    )
    return None


def load():
    """The loaded extension module (its kernels registered), or None. Cached: the work (finding,
    maybe building) happens once per process; later calls are a flag check."""
    global _loaded, _module
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            _module = None if disabled() else _load()
            _loaded = True
    return _module


def unavailable() -> str | None:
    """Why the extension serves nothing here (loading it if need be), or None when it is loaded."""
    if disabled():
        return "LLP_FAST_DISABLE_EXT=1"
    if load() is None:
        return f"extension not built: {_failure or 'unknown error'}"
    return None


def describe() -> str:
    """Which compiled module is loaded: the prebuilt ``llp_fast._C`` or a JIT build."""
    module = load()
    if module is None:
        return "not loaded"
    name = module.__name__
    return f"{name} loaded" if name == "llp_fast._C" else f"{name} (JIT-built) loaded"


def cpu_paths() -> str | None:
    """Which CPU paths the extension's kernels take on this machine (``llp_fast._C.cpu_paths``:
    the scan's instruction set, the fused float32 tile, bf16 tiles, the bf16 first pass; docs/method.md
    §4), or None where it is not loaded. A ``LLP_FAST_CPU_*`` setting that names nothing
    raises ValueError, as the first op call would."""
    module = load()
    if module is None or not hasattr(module, "cpu_paths"):
        return None
    return module.cpu_paths()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension (loaded now if need be) registers a kernel for ``llp_fast::op`` on
    ``device_type`` ("cpu" or "cuda"): the op table's ``extension`` column, once the extension loads."""
    from ._op_table import extension_ops  # here: setup.py loads this file on its own, outside the package

    if device_type not in ("cpu", "cuda") or op not in extension_ops(device_type):
        return False
    module = load()
    if module is None:
        return False
    return device_type == "cpu" or bool(getattr(module, "with_cuda", 0))
