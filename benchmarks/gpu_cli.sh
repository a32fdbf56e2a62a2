#!/usr/bin/env bash
# The product path on a GPU (issue 13): `ssdopt build / evaluate / detect / bench --device cuda`, the
# same commands as on the CPU, run on the device machine in one call each.
#
# Usage (repo root, GPU machine; carry .whl = pycocotools + onnxruntime-extensions wheels for the device's
# Python, and .gpu/data = `ssdopt data generate --out .gpu/data --train 1 --val 300 --test 1`):
#   STEP=engines OUT=<dir> bash benchmarks/gpu_cli.sh   # build fp16, bring it back, evaluate, detect, bench
#   STEP=peers   OUT=<dir> bash benchmarks/gpu_cli.sh   # bench: torch.compile peers + fp16/bf16 engines
#   STEP=batch   OUT=<dir> bash benchmarks/gpu_cli.sh   # bench at large batches: throughput
#   STEP=audit   OUT=<dir> bash benchmarks/gpu_cli.sh   # evaluate fp16 --reference an ONNX Runtime fp32 CPU engine
#   STEP=sweep   OUT=<dir> bash benchmarks/gpu_cli.sh   # bench: peers + the engines of PRECISIONS, batch 1, and
#                                                       # their best images/s over BATCHES (--throughput-batches)
# STEP may name several steps ("audit peers batch"); PEERS overrides the peers step's torch.compile modes.
# Another checkpoint: CK=<file> TAG=<name> (engines under .gpu/engines/<TAG>-torch-aoti-<precision>), e.g. the
# trained ssd300_vgg16: CK=artifacts/reference/ssd300_shapes_fp16.safetensors TAG=ssd300 (carried).
# BUDGET_S (default 560) bounds the whole step: each command gets min(its own limit, what is left), so
# a step ends inside the device call's 600 s and everything done so far is under $OUT. Logs: $OUT/<step>_log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
STEP=${STEP:-engines}
BUDGET_S=${BUDGET_S:-560}
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
CK=${CK:-data/reference/ssdlite320_shapes.safetensors}
TAG=${TAG:-}
DS=.gpu/data/val.json
W=/tmp/gpu_work${TAG:+_$TAG}
log="$OUT/${TAG:+${TAG}_}${STEP// /_}_log.txt"
say() { echo "== $(date -u +%H:%M:%S) +${SECONDS}s $*" | tee -a "$log"; }
run() {  # run LIMIT CMD...: bounded by LIMIT and by what is left of BUDGET_S
  local limit=$1 left=$((BUDGET_S - SECONDS - 5)); shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then say "skipped (budget spent): $*"; return 1; fi
  say "[limit ${limit}s] $*"; timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}; say "rc=$rc"; return "$rc"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
  nproc
} >>"$log" 2>&1
if [ ! -f "$DS" ]; then  # the val images of the carried .gpu/data, generated here when not carried
  run 120 ssdopt data generate --out .gpu/data --train 1 --val 300 --test 1 || exit 1
fi

engine() {  # an engine carried back in .gpu/engines (from an earlier call) is used as it is
  local name=${TAG:+$TAG-}torch-aoti-$1
  if [ -f ".gpu/engines/$name/metadata.json" ]; then echo ".gpu/engines/$name"; else echo "$W/engines/$name"; fi
}
build() {  # build one torch-aoti CUDA engine at a stable path (from the export, as `make run` does)
  [ -f "$(engine "$1")/metadata.json" ] && return 0
  [ -f "$W/onnx/model_nms.onnx" ] || run 150 ssdopt export --checkpoint "$CK" --out "$W/onnx" || return 1
  run 240 ssdopt build --backend torch-aoti --device cuda --precision "$1" --onnx "$W/onnx/model_nms.onnx" \
    --max-batch "${MAX_BATCH:-256}" --exact-out "$(engine "$1")"
}
bench() {  # bench LIMIT NAME ARGS...: `ssdopt bench --device cuda`, its JSON/Markdown copied to $OUT
  local limit=$1 name=$2; shift 2
  # --backends tensorrt: the bench's own build list is TensorRT only (a ❌ row here: it cannot be
  # installed); the torch-aoti engines are the ones built above, passed with --engine.
  run "$limit" ssdopt bench --device cuda --checkpoint "$CK" --dataset "$DS" --backends tensorrt \
    --precisions fp16 --out "$W/reports_$name" --work "$W/bench" "$@"
  cp "$W/reports_$name/bench.json" "$OUT/bench_gpu_$name.json" 2>/dev/null
  cp "$W/reports_$name/bench.md" "$OUT/bench_gpu_$name.md" 2>/dev/null
}

for step in $STEP; do
case "$step" in
engines)
  build fp16
  # the engine comes back at once, in parts of at most 15 MB (the device returns files of 16 MB at most)
  tar -C "$W/engines" -czf - torch-aoti-fp16 | split -b 15M -d - "$OUT/torch-aoti-fp16.tgz.part"
  run 150 ssdopt evaluate "$(engine fp16)" --dataset "$DS" --latency --out "$OUT/eval_fp16.json"
  run 90 ssdopt detect --engine "$(engine fp16)" .gpu/data/val/000001.jpg .gpu/data/val/000002.jpg --out "$W/detect"
  tar -C "$W" -czf "$OUT/detect.tgz" detect 2>/dev/null
  bench 400 engines --limit 100 --peers torch-eager --engine "$(engine fp16)"
  ;;
sweep)
  engines=()
  for p in ${PRECISIONS:-fp16}; do build "$p" && engines+=(--engine "$(engine "$p")"); done
  bench "${SWEEP_LIMIT_S:-560}" "${TAG:+${TAG}_}sweep" --limit 64 --peers "${PEERS:-torch-eager}" \
    --compile-timeout-s "${COMPILE_TIMEOUT_S:-300}" --throughput-batches "${BATCHES:-1,32,64,128,256}" "${engines[@]}"
  ;;
peers)
  build fp16
  bench 560 peers --limit 50 --peers "${PEERS:-torch-eager,torch-compile-reduce-overhead,torch-compile-network-reduce-overhead}" \
    --engine "$(engine fp16)"
  ;;
audit)
  build fp16
  # the GPU engine's mAP against the fp32 CPU engine (ONNX Runtime) on the same val images: the JSON
  # `ssdopt track log ENGINE --evaluation` takes on the CPU machine (ΔmAP + agreement for the gate)
  [ -f "$W/onnx/model_nms.onnx" ] || run 150 ssdopt export --checkpoint "$CK" --out "$W/onnx"
  run 150 ssdopt build --backend onnxruntime --device cpu --precision fp32 --onnx "$W/onnx/model_nms.onnx" \
    --exact-out "$W/engines/onnxruntime-fp32"
  run 150 ssdopt evaluate "$(engine fp16)" --dataset "$DS" --reference "$W/engines/onnxruntime-fp32" --latency \
    --out "$OUT/eval_fp16_vs_cpu_fp32.json"
  ;;
batch)
  build fp16
  for b in ${BATCHES:-256}; do
    bench 300 "batch$b" --limit 64 --batch "$b" --peers torch-eager --engine "$(engine fp16)"
  done
  ;;
esac
done
say "done"
