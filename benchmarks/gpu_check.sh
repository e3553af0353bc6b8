#!/usr/bin/env bash
# One-shot GPU check (issue 12): run once on a machine with an NVIDIA GPU after the README's set-up
# (python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'). About 4-5 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        (default: runs/gpu_check/<date-time>)
#
# Steps, each under its own time limit (a stuck step is killed and recorded, the next one still runs):
#   0. build    the C++ CPU ops (the CUDA tests compare with them), so that the tests' limit excludes it
#   1. tests    pytest -m cuda: the ops' CUDA kernels (Triton: multi-scale deformable attention and Lite
#               DETR's key-aware one) on the device against the pure-PyTorch reference and the CPU ops
#               (fp32, fp16, bf16, fp64 gradcheck, any batch, opcheck, autocast); 4 processes with xdist
#   2. cpp      the opt-in CUDA C++ kernels: built with nvcc (SDETR_MSDA_CUDA=1), compared with Triton, and
#               the same op tests run through them (SDETR_MSDA_CUDA_IMPL=cpp)
#   3. op       benchmarks/ms_deform_attn.py --device cuda: the op against the reference, fp32/fp16/bf16;
#               op_cpp: the same through the CUDA C++ kernels (when step 2 passed), for the Triton-vs-C++
#               comparison; kda: benchmarks/kda.py --device cuda, Lite DETR's key-aware attention, fp32/bf16
#   4. fps      `sdetr cost --json` for r50_efficient_detr and r50_sparse_detr_rho_0.1: FPS at batch 1 and 4
#               (one image repeated to the batch, no_grad, 5 warm-ups, CUDA synchronised around each
#               forward; the paper's V100 B4FPS: 18.2 vs 26.5, ratio 1.46). The image is the official
#               approximation's random 3x850x1040 one, or the first val image of $COCO_DIR when set.
#   5. train_step  benchmarks/train_step.py --device cuda: R50 Sparse DETR and Efficient DETR training
#               steps, fp32/bf16 x contiguous/channels-last, batch 2 at 800x1066/1199
#      train    20 steps of tiny_sparse_detr_rho_0.1 on one Ray Train GPU worker (NCCL, bf16 autocast) on
#               80 synthetic images (`sdetr data synth`)
# On an H200 the steps took 224 s (docs/benchmarks.md), plus about a minute of nvcc where the CUDA C++
# kernels are not built yet, and about 30 s for train_step (added after that run); the time limits (2-5
# times those figures) add up to 11 minutes.
# Everything goes to RESULTS_DIR: one log per step and results.json (per step: status, seconds, exit
# code, and the figures it produced).
#
# Exit code: 0 when every step passed; 1 when a step failed or timed out (results.json says which);
# 3 without a usable GPU (nothing is run: this check is only meaningful on a GPU).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-$repo/.venv/bin/python}"
sdetr=("$(dirname "$py")/sdetr")
if [[ ! -x "${sdetr[0]}" ]]; then sdetr=("$py" -m sdetr.platform.cli); fi  # PYTHON without its own script
out="${1:-$repo/runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch ($py): nothing to check. Run this on a machine with an" >&2
  echo "gpu_check: NVIDIA GPU after the README's set-up (nvidia-smi must list it)." >&2
  exit 3
fi
mkdir -p "$out"
echo "gpu_check: results in $out"

status_file="$out/steps.tsv"
: >"$status_file"
failed=0

# run_step NAME TIMEOUT_S COMMAND...: runs the command with its output in NAME.log; never stops the script.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS rc=0
  echo "gpu_check: [$name] $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
  local state=passed
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then state=timeout; elif [[ $rc -ne 0 ]]; then state=failed; fi
  [[ $state == passed ]] || failed=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$state" "$rc" "$((SECONDS - start))" >>"$status_file"
  echo "gpu_check: [$name] $state (exit $rc, $((SECONDS - start)) s)"
}

"$py" - >"$out/environment.json" <<'PY' || true
import json, torch
import triton
print(json.dumps({"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}))
PY

run_step build 90 "$py" -c 'from sdetr.detector import ops; st = ops.build(); print(st); assert st["loaded"], st'
# pytest-xdist (a dev dependency): 4 processes, which mostly overlap the kernels' first compiles.
XDIST_ARGS=""
if "$py" -c 'import xdist' 2>/dev/null; then XDIST_ARGS="-n 4"; fi
export XDIST_ARGS
run_step tests 100 "$py" -m pytest -q -m cuda -p no:cacheprovider $XDIST_ARGS \
  tests/test_triton_msda.py tests/test_ms_deform_attn_op.py tests/test_kda_op.py
run_step cpp 120 env SDETR_MSDA_CUDA=1 bash -c '
  set -euo pipefail
  "$0" -c "from sdetr.detector import ops; st = ops.build(); assert st[\"cuda_kernels\"], st; print(st)"
  "$0" -m pytest -q -m cuda -p no:cacheprovider tests/test_triton_msda.py -k cpp_backend
  SDETR_MSDA_CUDA_IMPL=cpp "$0" -m pytest -q -m cuda -p no:cacheprovider $XDIST_ARGS tests/test_ms_deform_attn_op.py
' "$py"
run_step op 45 "$py" benchmarks/ms_deform_attn.py --device cuda --repeats 15
run_step kda 45 "$py" benchmarks/kda.py --device cuda --repeats 15
if grep -q $'^cpp\tpassed' "$status_file"; then
  run_step op_cpp 30 env SDETR_MSDA_CUDA=1 SDETR_MSDA_CUDA_IMPL=cpp \
    "$py" benchmarks/ms_deform_attn.py --device cuda --repeats 15
fi
val_args=()
if [[ -n "${COCO_DIR:-}" ]]; then val_args=(--val 1 --data "$COCO_DIR"); fi
for preset in r50_efficient_detr r50_sparse_detr_rho_0.1; do
  run_step "fps_$preset" 35 "${sdetr[@]}" cost "$preset" --json --device cuda "${val_args[@]}"
done
run_step train_step 60 "$py" benchmarks/train_step.py --device cuda --rounds 3
run_step train 100 bash -c '
  set -euo pipefail
  out="$0"  # then the sdetr command in "$@"
  "$@" data synth --out "$out/synth" --train 80 --val 8 --seed 0
  "$@" train --preset tiny_sparse_detr_rho_0.1 --data "$out/synth" --workers 1 --gpus-per-worker 1 \
    --storage "$out/runs" --name gpu-check --epochs 1 --mlflow-uri none \
    --set train.amp=bf16 --set data.max_train_images=80 --set data.max_val_images=8 --set optim.batch_size=4 \
    --set train.log_every_steps=1 --set train.progress=false
' "$out" "${sdetr[@]}"

"$py" - "$out" <<'PY' || failed=1
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, state, rc, seconds = line.split("\t")
    log = (out / f"{name}.log").read_text(errors="replace")
    steps[name] = {"status": state, "exit_code": int(rc), "seconds": int(seconds), "log": f"{name}.log",
                   "tail": log.strip().splitlines()[-3:]}
b4 = {}
for name, step in steps.items():
    if name.startswith("fps_"):
        rows = [json.loads(ln) for ln in (out / step["log"]).read_text().splitlines() if ln.startswith("{")]
        keys = ("fps_b1", "fps_b4", "latency_ms", "gflops", "msda_backend", "input")
        step["figures"] = {k: rows[-1].get(k) for k in keys} if rows else {}
        b4[name[4:]] = step["figures"].get("fps_b4")
fps = {"b4fps": b4, "paper_v100_b4fps": {"r50_efficient_detr": 18.2, "r50_sparse_detr_rho_0.1": 26.5}}
if b4.get("r50_efficient_detr") and b4.get("r50_sparse_detr_rho_0.1"):
    fps["ratio_sparse_over_efficient"] = b4["r50_sparse_detr_rho_0.1"] / b4["r50_efficient_detr"]
    fps["paper_ratio"] = 1.46
for name in ("op", "op_cpp", "kda", "train_step"):
    if name in steps:
        lines = (out / f"{name}.log").read_text().splitlines()
        steps[name]["table"] = [ln for ln in lines if re.search(r"\d+\.\d+x", ln)]
if "tests" in steps:
    lines = (out / "tests.log").read_text().splitlines()
    summary = [ln for ln in lines if re.search(r"\d+ (passed|failed|skipped)", ln)]
    steps["tests"]["summary"] = summary[-1:]
env = out / "environment.json"
result = {"environment": json.loads(env.read_text()) if env.stat().st_size else {}, "fps": fps, "steps": steps}
result["all_passed"] = all(s["status"] == "passed" for s in steps.values())
(out / "results.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: v["status"] for k, v in steps.items()}))
PY
echo "gpu_check: wrote $out/results.json"
exit "$failed"
