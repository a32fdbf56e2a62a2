#!/usr/bin/env bash
# One device session for the SSDDecodeNMS CUDA kernel: build, tests, compute-sanitizer, benchmark.
# Usage (repo root, GPU machine): OUT=<dir> bash benchmarks/nms_gpu_run.sh
# Writes $OUT/{nms_pytest.txt, nms_sanitizer.txt, nms_gpu.json, nms_gpu_log.txt}.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export SSDOPT_CUDA_ARCHS=${SSDOPT_CUDA_ARCHS:-90}     # this GPU only: the build is for testing here
export SSDOPT_BUILD_DIR=${SSDOPT_BUILD_DIR:-/tmp/ssdopt_build}
PY=${PY:-python3}
log="$OUT/nms_gpu_log.txt"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
  "$CUDA_HOME/bin/nvcc" --version | tail -2
} >"$log" 2>&1
start=$(date +%s)
"$PY" -c "from ssdopt.ops.library import load_torch_ops; print('torch op:', load_torch_ops())" >>"$log" 2>&1 \
  || { echo "BUILD FAILED"; tail -60 "$log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" >>"$log"

# CUDA tests (radix-select top-k on, the default); if they fail, again with it off.
"$PY" -m pytest tests/ops/test_decode_nms_cuda.py -q -p no:cacheprovider --timeout 300 -rfE >"$OUT/nms_pytest.txt" 2>&1
status=$?
echo "pytest (select on) exit $status after $(( $(date +%s) - start )) s" >>"$log"
if [ $status -ne 0 ]; then
  export SSDOPT_NMS_CUDA_SELECT=0
  echo "===== SSDOPT_NMS_CUDA_SELECT=0 =====" >>"$OUT/nms_pytest.txt"
  "$PY" -m pytest tests/ops/test_decode_nms_cuda.py -q -p no:cacheprovider --timeout 300 -rfE >>"$OUT/nms_pytest.txt" 2>&1
  echo "pytest (select off) exit $? after $(( $(date +%s) - start )) s" >>"$log"
fi
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

san="$OUT/nms_sanitizer.txt"
: >"$san"
for tool in memcheck racecheck; do
  echo "===== compute-sanitizer --tool $tool --kernel-name kns=ssdopt (PYTORCH_NO_CUDA_MEMORY_CACHING=1) =====" >>"$san"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool "$tool" --kernel-name kns=ssdopt \
    "$PY" benchmarks/nms_gpu.py --sanitizer-driver >>"$san" 2>&1
  echo "exit $?" >>"$san"
done
echo "sanitizers done after $(( $(date +%s) - start )) s" >>"$log"

timeout 300 "$PY" benchmarks/nms_gpu.py --out "$OUT/nms_gpu.json" >>"$log" 2>&1
echo "benchmark exit $? after $(( $(date +%s) - start )) s" >>"$log"
tail -5 "$OUT/nms_pytest.txt"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit" "$san"; tail -25 "$log"
