#!/usr/bin/env bash
# Compile every CUDA source of the extension to an object file (nvcc -c, no link), against the
# torch headers of the Python in use. Needs nvcc but no GPU and no CUDA torch: the CPU wheel ships
# the CUDA headers (ATen/cuda, c10/cuda). A CUDA syntax or type error fails CI here.
#   usage: .ci/compile_cuda.sh [python]      (default: $PYTHON, else python3)
# Set CUDA_ARCH (default 90: H100/H200) to compile for another architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 1
fi
ARCH="${CUDA_ARCH:-90}"
# torch leaves CUDA_HOME unset in a CPU build: ask nvcc where its toolkit is (nvcc may be a wrapper
# script, so its own path says nothing).
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME="$("$NVCC" -v --version 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
fi
export CUDA_HOME

mapfile -t INCLUDES < <("$PY" - <<'PYEOF'
import os
import sysconfig

from torch.utils import cpp_extension

# include_paths(device_type="cuda") is torch's own list, but it reads torch's CUDA_HOME, which a
# CPU build of torch leaves None; then take the CPU list plus the toolkit's include folder.
try:
    paths = cpp_extension.include_paths(device_type="cuda")
except (OSError, TypeError):
    paths = cpp_extension.include_paths() + [os.path.join(os.environ["CUDA_HOME"], "include")]
for p in paths + [sysconfig.get_paths()["include"]]:
    print(p)
PYEOF
)
if [[ ${#INCLUDES[@]} -eq 0 ]]; then
  echo "compile_cuda: could not get torch's include paths from $PY" >&2
  exit 1
fi
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
STD=$("$PY" -c "import torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 10) else 'c++17')")
# The flags torch.utils.cpp_extension gives nvcc, so that the headers see the same configuration.
FLAGS=(-c -std="$STD" -O3 -DLLP_FAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -D_GLIBCXX_USE_CXX11_ABI="$ABI" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       --compiler-options=-fPIC -gencode="arch=compute_${ARCH},code=sm_${ARCH}" -Icsrc)
for inc in "${INCLUDES[@]}"; do FLAGS+=(-I"$inc"); done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# A CPU wheel of torch ships c10/cuda but not the header CMake generates for it in CUDA builds;
# supply the CUDA build's one-line version (shared c10_cuda) when it is missing.
if ! "$PY" -c "import sys, os; from torch.utils import cpp_extension as c; sys.exit(not any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in c.include_paths()))"; then
  mkdir -p "$OUT/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/shim/c10/cuda/impl/cuda_cmake_macros.h"
  FLAGS+=(-I"$OUT/shim")
fi
status=0
shopt -s globstar nullglob
for src in csrc/**/*.cu; do
  obj="$OUT/$(basename "${src%.cu}").o"
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$obj"; then
    echo "compile_cuda: ok   $src ($(stat -c %s "$obj") bytes)"
  else
    echo "compile_cuda: FAIL $src" >&2
    status=1
  fi
done
exit $status
