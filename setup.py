"""Builds llp_fast. ``kernels/`` (Triton) is installed as ``llp_fast.kernels``.

The C++ extension ``llp_fast._C`` (``csrc/``) is built from the CPU sources always, plus the
``.cu`` sources when ``CUDA_HOME`` is set and torch is a CUDA build (``torch.version.cuda``);
whether a GPU is visible does not matter. Build switches:

    LLP_FAST_FORCE_CUDA=1   build the CUDA sources too, and fail the install if that fails
    LLP_FAST_FORCE_CPU=1    never build the CUDA sources
    LLP_FAST_SKIP_EXT=1     build no extension at all (llp_fast JIT-builds it on first use)
    MAX_JOBS, TORCH_CUDA_ARCH_LIST   as torch.utils.cpp_extension reads them

Rule for a failed extension build: the install still succeeds, without ``llp_fast._C``, and says so;
at run time ``llp_fast`` JIT-builds the extension on first use or, failing that, warns once and uses
the pure-PyTorch reference. (A forced CUDA build is the exception: it fails loudly.)

torch is imported if present and never required: without it (an isolated build environment) the
package installs without the extension. Build with ``--no-build-isolation`` against the installed torch.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = Path(__file__).resolve().parent
packages = find_packages(include=["llp_fast", "llp_fast.*"]) + ["llp_fast.kernels"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _ext_config():
    """llp_fast/_ext.py, loaded as a plain file: the one list of sources and flags (importing the
    package would import torch and the ops)."""
    spec = importlib.util.spec_from_file_location("_llp_fast_ext_config", ROOT / "llp_fast" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative(paths):
    # setuptools wants sources relative to setup.py.
    return [os.path.relpath(p, ROOT) for p in paths]


def _extensions_and_command():
    """([llp_fast._C], build_ext command), or ([], setuptools' build_ext) when there is nothing to
    build: LLP_FAST_SKIP_EXT=1, or no torch (an isolated build env: use --no-build-isolation)."""
    if _flag("LLP_FAST_SKIP_EXT"):
        return [], _setuptools_build_ext
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("llp_fast: torch is not importable at build time; llp_fast._C is not built (JIT on first use).")
        return [], _setuptools_build_ext

    cfg = _ext_config()
    cuda = not _flag("LLP_FAST_FORCE_CPU") and (
        _flag("LLP_FAST_FORCE_CUDA") or (CUDA_HOME is not None and bool(torch.version.cuda))
    )
    common = dict(
        name="llp_fast._C",
        sources=_relative(cfg.sources(cuda, ROOT / "csrc")),
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=cfg.ld_flags(),
    )
    if cuda:
        ext = CUDAExtension(**common, extra_compile_args={"cxx": cfg.cxx_flags(True), "nvcc": cfg.nvcc_flags()})
    else:
        ext = CppExtension(**common, extra_compile_args={"cxx": cfg.cxx_flags(False)})

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension (ninja, MAX_JOBS, TORCH_CUDA_ARCH_LIST), made optional: a failed
        build leaves the install without llp_fast._C instead of failing it, unless
        LLP_FAST_FORCE_CUDA=1 asked for the CUDA kernels explicitly."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler or ninja, a compile error, a toolkit mismatch
                if _flag("LLP_FAST_FORCE_CUDA"):
                    raise
                print(
                    f"llp_fast: WARNING: the C++ extension was not built ({type(e).__name__}: {e}); "
                    "llp_fast will build it on first use (JIT) or fall back to the pure-PyTorch reference.",
                    file=sys.stderr,
                )

        def get_outputs(self):
            # Only what exists: editable installs map these paths, and a skipped build made none.
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], OptionalBuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions_and_command()

setup(
    packages=packages,
    package_dir={"llp_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
