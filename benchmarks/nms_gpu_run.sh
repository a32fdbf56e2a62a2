#!/usr/bin/env bash
# One device session for the SSDDecodeNMS CUDA kernel: build, tests, benchmarks, compute-sanitizer.
# Usage (repo root, GPU machine): OUT=<dir> bash benchmarks/nms_gpu_run.sh
# Writes $OUT/{nms_gpu_log.txt, nms_pytest.txt, nms_gpu_real.json, nms_gpu_real_before.json, nms_gpu_real_variant.json,
#              nms_sanitizer.txt, nms_gpu.json}.
# Before/after in one call: when $NMS_BASELINE (default .nms_baseline/decode_nms_cuda.cu: an older kernel
# source, git-ignored, carried to the device) exists, a copy of the tree with that kernel is built too and
# `nms_gpu.py --real` runs in it first (nms_gpu_real_before.json); the current kernel's run merges it
# (nms_gpu_real.json, "before"). $NMS_VARIANT (optional, another kernel source) is built and timed the same
# way, without torchvision, after the current kernel (nms_gpu_real_variant.json): a side measurement only.
# SKIP_DEFAULT=1 skips the seeded-synthetic benchmark (nms_gpu.json); SKIP_SANITIZER=1 the sanitizers.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export SSDOPT_CUDA_ARCHS=${SSDOPT_CUDA_ARCHS:-90}     # this GPU only: the build is for testing here
export SSDOPT_BUILD_DIR=${SSDOPT_BUILD_DIR:-/tmp/ssdopt_build}
PY=${PY:-python3}
ROOT=$(pwd)
BASE=/tmp/nms_baseline_tree
VAR=/tmp/nms_variant_tree
NMS_BASELINE=${NMS_BASELINE:-.nms_baseline/decode_nms_cuda.cu}
NMS_VARIANT=${NMS_VARIANT:-}
log="$OUT/nms_gpu_log.txt"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  sha256sum plugins/nms/src/cuda/decode_nms_cuda.cu
} >"$log" 2>&1
start=$(date +%s)
build() { "$PY" -c "from ssdopt.ops.library import load_torch_ops; print('torch op:', load_torch_ops())"; }
tree_with_kernel() {  # tree_with_kernel DIR SOURCE: a copy of this tree holding SOURCE as the kernel
  rm -rf "$1"; mkdir -p "$1"
  tar --exclude=./.nms_baseline --exclude=./build -cf - . | tar -xf - -C "$1"
  cp "$2" "$1/plugins/nms/src/cuda/decode_nms_cuda.cu"
}
have_base=0
if [ -f "$NMS_BASELINE" ]; then
  tree_with_kernel "$BASE" "$NMS_BASELINE"
  echo "baseline kernel ($NMS_BASELINE): $(sha256sum "$BASE/plugins/nms/src/cuda/decode_nms_cuda.cu")" >>"$log"
  (cd "$BASE" && build) >"$OUT/.base_build.txt" 2>&1 &
  base_pid=$!
  have_base=1
fi
have_var=0
if [ -n "$NMS_VARIANT" ] && [ -f "$NMS_VARIANT" ]; then
  tree_with_kernel "$VAR" "$NMS_VARIANT"
  echo "variant kernel ($NMS_VARIANT): $(sha256sum "$VAR/plugins/nms/src/cuda/decode_nms_cuda.cu")" >>"$log"
  (cd "$VAR" && build) >"$OUT/.var_build.txt" 2>&1 &
  var_pid=$!
  have_var=1
fi
build >>"$log" 2>&1 || { echo "BUILD FAILED"; tail -80 "$log"; exit 1; }
if [ $have_base = 1 ]; then
  wait $base_pid && echo "baseline build ok" >>"$log" || { echo "BASELINE BUILD FAILED" >>"$log"; have_base=0; }
  cat "$OUT/.base_build.txt" >>"$log"; rm -f "$OUT/.base_build.txt"
fi
if [ $have_var = 1 ]; then
  wait $var_pid && echo "variant build ok" >>"$log" || { echo "VARIANT BUILD FAILED" >>"$log"; have_var=0; }
  cat "$OUT/.var_build.txt" >>"$log"; rm -f "$OUT/.var_build.txt"
fi
echo "build: $(( $(date +%s) - start )) s" >>"$log"

"$PY" -m pytest tests/ops/test_decode_nms_cuda.py -q -p no:cacheprovider --timeout 300 -rfE >"$OUT/nms_pytest.txt" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" >>"$log"
# Does a C++ argument error (TORCH_CHECK) reach Python on this torch build?
"$PY" - >>"$log" 2>&1 <<'PYEOF'
import torch
from ssdopt.ops import decode_nms
d, l, a = torch.zeros(1, 10, 4), torch.zeros(1, 10, 3), torch.zeros(5, 4)
try:
    decode_nms(d, l, a)
except RuntimeError as exc:
    print("TORCH_CHECK reached Python:", str(exc).splitlines()[0])
PYEOF
echo "torch_check probe exit $?" >>"$log"

if [ $have_base = 1 ]; then
  (cd "$BASE" && timeout 200 "$PY" benchmarks/nms_gpu.py --real --no-baseline --label before \
    --out "$OUT/nms_gpu_real_before.json") >>"$log" 2>&1
  echo "real benchmark (before) exit $? after $(( $(date +%s) - start )) s" >>"$log"
fi
timeout 300 "$PY" benchmarks/nms_gpu.py --real --label after --merge-old "$OUT/nms_gpu_real_before.json" \
  --out "$OUT/nms_gpu_real.json" >>"$log" 2>&1
echo "real benchmark exit $? after $(( $(date +%s) - start )) s" >>"$log"
if [ $have_var = 1 ]; then
  (cd "$VAR" && timeout 200 "$PY" benchmarks/nms_gpu.py --real --no-baseline --label variant \
    --out "$OUT/nms_gpu_real_variant.json") >>"$log" 2>&1
  echo "real benchmark (variant) exit $? after $(( $(date +%s) - start )) s" >>"$log"
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  san="$OUT/nms_sanitizer.txt"
  : >"$san"
  for tool in memcheck racecheck; do
    echo "===== compute-sanitizer --tool $tool --kernel-name kns=ssdopt (PYTORCH_NO_CUDA_MEMORY_CACHING=1) =====" >>"$san"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool "$tool" --kernel-name kns=ssdopt \
      "$PY" benchmarks/nms_gpu.py --sanitizer-driver >>"$san" 2>&1
    echo "exit $?" >>"$san"
  done
  echo "sanitizers done after $(( $(date +%s) - start )) s" >>"$log"
fi

if [ "${SKIP_DEFAULT:-0}" != 1 ]; then
  timeout 200 "$PY" benchmarks/nms_gpu.py --out "$OUT/nms_gpu.json" >>"$log" 2>&1
  echo "benchmark exit $? after $(( $(date +%s) - start )) s" >>"$log"
fi
tail -5 "$OUT/nms_pytest.txt"
[ -f "$OUT/nms_sanitizer.txt" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit" "$OUT/nms_sanitizer.txt"
grep -E "exit|build:|FAILED" "$log"
"$PY" - "$OUT/nms_gpu_real.json" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:  # noqa: BLE001
    print("no real-benchmark JSON:", exc); sys.exit(0)
for r in d["rows"]:
    tv = r.get("torchvision_postprocess_ms")
    print(f"{r['case']:20s} B={r['B']:2d} cand/img={r['candidates_per_image']:8.0f} det/img={r['detections_per_image']:6.1f} "
          f"eager={r['ours_us']:7.1f} ({r['ours_us_repeat']:7.1f}) graph={r['ours_graph_us']:7.1f} ({r['ours_graph_us_repeat']:7.1f}) us "
          f"raw={r.get('ours_raw_op_us', 0):7.1f} tv={tv} same={r.get('num_detections_equal')} diff={r.get('max_sorted_score_diff')}")
    print("    ", r["kernels_us"])
    if "quota400_graph_us" in r:
        print("     quota 400: graph", round(r["quota400_graph_us"], 1), r["quota400_kernels_us"])
for r in (d.get("before") or {}).get("rows", []):
    print(f"BEFORE {r['case']:20s} B={r['B']:2d} eager={r['ours_us']:7.1f} graph={r['ours_graph_us']:7.1f}", r["kernels_us"])
try:
    for r in json.load(open(sys.argv[1].replace("nms_gpu_real.json", "nms_gpu_real_variant.json")))["rows"]:
        print(f"VARIANT {r['case']:20s} B={r['B']:2d} eager={r['ours_us']:7.1f} graph={r['ours_graph_us']:7.1f} "
              f"({r['ours_graph_us_repeat']:7.1f})", r["kernels_us"])
except OSError:
    pass
print(json.dumps(d["summary"]))
PYEOF
