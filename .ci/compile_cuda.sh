#!/usr/bin/env bash
# Compile the CUDA sources of the ms_deform_attn op (csrc/cuda/*.cu: the opt-in CUDA C++ backend, built at
# run time only with SDETR_MSDA_CUDA=1; Triton serves CUDA tensors by default and its kernels are compiled
# for sm_80/sm_90 by tests/test_triton_msda.py) and the op's dispatcher (csrc/ms_deform_attn.cpp) with
# nvcc for sm_80 and sm_90, using torch's headers and nvcc flags.
# Produces object files only (no GPU needed); exits non-zero if any file fails to compile.
#
# Usage: .ci/compile_cuda.sh [python]      (python defaults to $PYTHON, then .venv/bin/python, then python3)
# Env:   CUDA_HOME (default: dir of `nvcc` on PATH, else /usr/local/cuda), CUDA_ARCHS (default "80 90"),
#        OUT_DIR (default: a temporary directory, removed at exit), NVCC_JOBS (default 2).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-${PYTHON:-}}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi

if [[ -z "${CUDA_HOME:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
nvcc="$CUDA_HOME/bin/nvcc"
if [[ ! -x "$nvcc" ]]; then
  echo "compile_cuda.sh: SKIPPED - nvcc not found (looked for \$CUDA_HOME/bin/nvcc = $nvcc and nvcc on PATH)."
  echo "compile_cuda.sh: install the CUDA toolkit or set CUDA_HOME to check the CUDA sources."
  exit 0
fi

# Torch's include dirs, C++ ABI and the nvcc flags torch.utils.cpp_extension uses.
mapfile -t torch_flags < <(CUDA_HOME="$CUDA_HOME" "$py" - <<'PY' 2>/dev/null
import logging
import sysconfig

logging.disable(logging.WARNING)  # cpp_extension warns at import when no CUDA runtime is found
import torch
from torch.utils import cpp_extension as ce

for d in ce.include_paths("cpu"):
    print(f"-I{d}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
PY
)
if [[ ${#torch_flags[@]} -eq 0 ]]; then
  echo "compile_cuda.sh: could not import torch with $py" >&2
  exit 1
fi

archs="${CUDA_ARCHS:-80 90}"
gencode=()
for a in $archs; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done
if [[ -n "${OUT_DIR:-}" ]]; then
  out="$OUT_DIR"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

echo "compile_cuda.sh: $("$nvcc" --version | tail -n 1)"
echo "compile_cuda.sh: archs: $archs; objects in $out"

common=(-std=c++20 -O3 -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=sdetr_msda -DTORCH_API_INCLUDE_EXTENSION_H
        "${torch_flags[@]}")
compile() {  # src obj extra-args...
  local src="$1" obj="$2"
  shift 2
  if "$nvcc" "${common[@]}" "$@" -c "$src" -o "$obj" >"$obj.log" 2>&1; then
    echo "  ok      ${src#"$repo"/}"
    if [[ -s "$obj.log" ]]; then cat "$obj.log"; fi
  else
    echo "  FAILED  ${src#"$repo"/}"
    cat "$obj.log"
    touch "$obj.failed"
  fi
}
jobs_max="${NVCC_JOBS:-2}"
srcs=("$repo"/csrc/cuda/*.cu "$repo"/csrc/ms_deform_attn.cpp)
for src in "${srcs[@]}"; do
  obj="$out/$(basename "$src").o"
  rm -f "$obj" "$obj.failed"
  if [[ "$src" == *.cu ]]; then extra=("${gencode[@]}"); else extra=(); fi
  compile "$src" "$obj" "${extra[@]}" &
  while (( $(jobs -rp | wc -l) >= jobs_max )); do sleep 1; done
done
wait
failed=0
for src in "${srcs[@]}"; do
  obj="$out/$(basename "$src").o"
  if [[ -e "$obj.failed" || ! -s "$obj" ]]; then failed=1; fi
done
if [[ $failed -ne 0 ]]; then
  echo "compile_cuda.sh: FAILED"
  exit 1
fi
echo "compile_cuda.sh: all CUDA sources compiled (${#srcs[@]} files)"
