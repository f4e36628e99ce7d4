#!/usr/bin/env bash
# Compile-only check of the CUDA backend; needs the CUDA toolkit, not a GPU.
#   - every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, with setup.py's nvcc
#     flags and the ones torch's BuildExtension adds (COMMON_NVCC_FLAGS);
#   - csrc/cuda/ops_cuda.cpp (the torch glue) with the host compiler against
#     torch's headers, as setup.py's CUDAExtension compiles it.
# Works with a CPU-only torch wheel too: its headers lack the generated
# c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE
# skips (it only carries a Windows export macro).
#
# Environment: PYTHON (default python) has torch; CUDA_HOME (default
# /usr/local/cuda-13.0) is the toolkit root; CXX (default g++).
set -euo pipefail

PYTHON="${PYTHON:-python}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
CXX="${CXX:-g++}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="$CUDA_HOME/bin/nvcc"
[[ -x "$NVCC" ]] || { echo "check_cuda: no nvcc at $NVCC (set CUDA_HOME)" >&2; exit 1; }

# One line each: torch's include dirs, setup.py's NVCC_FLAGS, setup.py's
# CXX_FLAGS, torch's COMMON_NVCC_FLAGS, the C++ ABI define. setup.py's flag
# lists are read from its source so that this check cannot drift from the build.
mapfile -t CONF < <("$PYTHON" - "$ROOT/setup.py" <<'EOF'
import ast
import sys

import torch
from torch.utils import cpp_extension

flags = {}
for node in ast.parse(open(sys.argv[1]).read()).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in ("CXX_FLAGS", "NVCC_FLAGS"):
            flags[node.targets[0].id] = ast.literal_eval(node.value)
print(" ".join("-I" + p for p in cpp_extension.include_paths()))
print(" ".join(flags["NVCC_FLAGS"]))
print(" ".join(flags["CXX_FLAGS"]))
print(" ".join(cpp_extension.COMMON_NVCC_FLAGS))
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
EOF
)
[[ ${#CONF[@]} -eq 5 ]] || { echo "check_cuda: could not read torch's or setup.py's flags" >&2; exit 1; }
read -r -a TORCH_INC <<<"${CONF[0]}"
read -r -a NVCC_FLAGS <<<"${CONF[1]}"
read -r -a CXX_FLAGS <<<"${CONF[2]}"
read -r -a TORCH_NVCC_FLAGS <<<"${CONF[3]}"
ABI="${CONF[4]}"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
COMMON_DEFS=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "$ABI")
ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

status=0
shopt -s nullglob
for src in "$ROOT"/csrc/cuda/*.cu; do
  echo "nvcc  ${src#"$ROOT"/}"
  "$NVCC" "${TORCH_NVCC_FLAGS[@]}" --compiler-options -fPIC "${NVCC_FLAGS[@]}" "${ARCHS[@]}" \
    "${COMMON_DEFS[@]}" -I"$ROOT/csrc" "${TORCH_INC[@]}" -Werror all-warnings \
    -c "$src" -o "$OUT/$(basename "$src").o" || status=1
done
for src in "$ROOT"/csrc/cuda/*.cpp; do
  echo "$CXX ${src#"$ROOT"/}"
  "$CXX" -std=c++20 -fPIC "${CXX_FLAGS[@]}" -DDDRS_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    "${COMMON_DEFS[@]}" -I"$ROOT/csrc" "${TORCH_INC[@]}" -I"$CUDA_HOME/include" \
    -I"$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    -Wall -Wextra -Wno-unused-parameter \
    -c "$src" -o "$OUT/$(basename "$src").o" || status=1
done
[[ $status -eq 0 ]] && echo "check_cuda: OK" || echo "check_cuda: FAILED" >&2
exit $status
