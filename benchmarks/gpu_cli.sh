#!/usr/bin/env bash
# The product path on a GPU (issue 13): `ssdopt build / evaluate / detect / bench --device cuda`, the
# same commands as on the CPU, run on the device machine in one call each.
#
# Usage (repo root, GPU machine; carry .whl = the pycocotools wheel for the device's Python, and .gpu/data =
# `ssdopt data generate --out .gpu/data --train 1 --val 300 --test 1`, the val split evaluated here too):
#   STEP=engines OUT=<dir> bash benchmarks/gpu_cli.sh   # build fp16/fp32/bf16, evaluate, detect, bench (eager peer)
#   STEP=peers   OUT=<dir> bash benchmarks/gpu_cli.sh   # bench with the torch.compile peers + a fp16 engine
#   STEP=batch   OUT=<dir> bash benchmarks/gpu_cli.sh   # bench at large batches: throughput
# Each step writes its logs, JSON and the engine it brings back (engines step: torch-aoti fp16, for
# `ssdopt track log` on the CPU machine) under $OUT; every command is bounded by `timeout`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
STEP=${STEP:-engines}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} SSDOPT_CUDA_ARCHS=${SSDOPT_CUDA_ARCHS:-90}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -c "import sys; sys.argv[0] = \\"ssdopt\\"; from ssdopt.cli import main; main()" "$@"\n' >/tmp/bin/ssdopt
chmod +x /tmp/bin/ssdopt
export PATH=/tmp/bin:$PATH
CK=data/reference/ssdlite320_shapes.safetensors
DS=.gpu/data/val.json
W=/tmp/gpu_work
log="$OUT/${STEP}_log.txt"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
run() { local limit=$1; shift; say "$*"; timeout "$limit" "$@" 2>&1 | tee -a "$log"; echo "rc=${PIPESTATUS[0]}" | tee -a "$log"; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
  nproc
} >>"$log" 2>&1

engine() { echo "$W/engines/torch-aoti-$1"; }
build() {  # build one torch-aoti CUDA engine at a stable path (from the export, as `make run` does)
  [ -f "$W/onnx/model_nms.onnx" ] || run 120 ssdopt export --checkpoint "$CK" --out "$W/onnx"
  run 240 ssdopt build --backend torch-aoti --device cuda --precision "$1" --onnx "$W/onnx/model_nms.onnx" \
    --max-batch "${MAX_BATCH:-256}" --exact-out "$(engine "$1")"
}

case "$STEP" in
engines)
  for p in fp16 fp32 bf16; do build "$p"; done
  run 150 ssdopt evaluate "$(engine fp16)" --dataset "$DS" --reference "$(engine fp32)" --latency --out "$OUT/eval_fp16.json"
  run 60 ssdopt detect --engine "$(engine fp16)" .gpu/data/val/000001.jpg .gpu/data/val/000002.jpg --out "$W/detect"
  tar -C "$W" -czf "$OUT/detect.tgz" detect
  # the engine comes back in parts of at most 15 MB (the device returns files of 16 MB at most)
  tar -C "$W/engines" -czf - torch-aoti-fp16 | split -b 15M -d - "$OUT/torch-aoti-fp16.tgz.part"
  run 300 ssdopt bench --device cuda --checkpoint "$CK" --dataset "$DS" --limit 300 --peers torch-eager \
    --backends tensorrt --precisions fp16 \
    --engine "$(engine fp32)" --engine "$(engine fp16)" --engine "$(engine bf16)" --out "$W/reports" --work "$W/bench"
  cp "$W/reports/bench.json" "$OUT/bench_gpu_engines.json"; cp "$W/reports/bench.md" "$OUT/bench_gpu_engines.md"
  ;;
peers)
  build fp16
  run 560 ssdopt bench --device cuda --checkpoint "$CK" --dataset "$DS" --limit 100 \
    --peers torch-eager,torch-compile-reduce-overhead,torch-compile-max-autotune --backends tensorrt --precisions fp16 \
    --engine "$(engine fp16)" --out "$W/reports" --work "$W/bench"
  cp "$W/reports/bench.json" "$OUT/bench_gpu_peers.json"; cp "$W/reports/bench.md" "$OUT/bench_gpu_peers.md"
  ;;
batch)
  for p in fp16 bf16; do build "$p"; done
  for b in ${BATCHES:-32 128 256}; do
    run 150 ssdopt bench --device cuda --checkpoint "$CK" --dataset "$DS" --limit 64 --batch "$b" --peers torch-eager \
      --backends tensorrt --precisions fp16 --engine "$(engine fp16)" --engine "$(engine bf16)" \
      --out "$W/reports_b$b" --work "$W/bench"
    cp "$W/reports_b$b/bench.json" "$OUT/bench_gpu_batch$b.json"
  done
  ;;
esac
say "done"
