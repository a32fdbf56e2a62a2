#!/usr/bin/env bash
# Train the reference SSDlite on one GPU, in one call of at most 10 minutes, from nothing but this repo:
# generate the synthetic train/val splits (seed of params.yaml), train within a wall-time budget,
# evaluate val mAP with pycocotools, write the checkpoint + training.json + log into $OUT.
#
# The exact device-tool call that produced data/reference/ (one H100, torch 2.11, pycocotools wheel carried
# in .whl/, `carry=[".whl"]`, timeout 480 s; the smoke run first checks every code path on tiny data):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#   MODE=smoke OUT=/tmp/smoke DATA=/tmp/smoke_data bash benchmarks/train_reference.sh > $OUT/smoke.log 2>&1 \
#     || { tail -40 $OUT/smoke.log; exit 1; };
#   BUDGET=330 OUT=$OUT bash benchmarks/train_reference.sh
# then, on the CPU machine: copy ssdlite320_shapes.safetensors and training.json into data/reference/ and
# re-evaluate with torchvision's own post-processing:
#   ssdopt data generate ... (or generate only the val split, same seed)  &&
#   python -m ssdopt.commands_models evaluate-checkpoint --dataset <root> --split val --device cpu
# Smoke run (tiny data, ~30 s):  MODE=smoke bash benchmarks/train_reference.sh
# Another torchvision SSD of the same classes (issue 5's ssd300 peer): MODEL=ssd300_vgg16 NAME=ssd300_shapes
# with its own LR/BATCH (VGG16 has no BatchNorm: a lower peak learning rate).
# The final val mAP on the device uses the batched post-processing (tested equal to torchvision's);
# re-evaluate the checkpoint with torchvision's own post-processing via `ssdopt evaluate-checkpoint`.
set -euo pipefail

OUT=${OUT:-artifacts/reference_run}
MODE=${MODE:-full}
DATA=${DATA:-/tmp/ssdopt_synthetic}
SEED=${SEED:-20261125}          # params.yaml generate.seed
MODEL=${MODEL:-ssdlite320_mobilenet_v3_large}
NAME=${NAME:-ssdlite320_shapes}
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$OUT"

if [ "$MODE" = smoke ]; then     # exercise every code path in ~30 s before spending the budget
  TRAIN_IMAGES=256; VAL_IMAGES=64; BUDGET=20; EVAL_EVERY=1; MAX_EPOCHS=2
else
  TRAIN_IMAGES=6000; VAL_IMAGES=1000; BUDGET=${BUDGET:-330}; EVAL_EVERY=${EVAL_EVERY:-50}; MAX_EPOCHS=600
fi

# (python3 -c, not a stdin script: the generator's spawned workers must be able to start a fresh interpreter)
python3 -c '
import sys, time
from ssdopt.data.synthetic import generate_dataset
data, seed, n_train, n_val, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
# Images are seeded by (seed, split, index): this val split is byte-identical to the one of the full dataset.
generate_dataset(data, seed=seed, image_size=320, splits={"train": n_train, "val": n_val}, workers=workers, progress=False)
print(f"generated {n_train} train + {n_val} val images in {time.perf_counter() - t:.1f} s with {workers} workers")
' "$DATA" "$SEED" "$TRAIN_IMAGES" "$VAL_IMAGES" "$WORKERS"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m ssdopt.commands_models train \
  --dataset "$DATA" \
  --out "$OUT/$NAME.safetensors" \
  --history "$OUT/${HISTORY:-training.json}" \
  --model "$MODEL" \
  --seed 0 \
  --batch-size ${BATCH:-128} \
  --optimizer ${OPTIMIZER:-adamw} --lr ${LR:-2e-3} --weight-decay ${WD:-0.05} --warmup-epochs 3 \
  --amp bf16 \
  --time-budget-s "$BUDGET" --max-epochs "$MAX_EPOCHS" \
  --eval-every "$EVAL_EVERY" \
  --final-eval ${FINAL_EVAL:-fast} \
  --device cuda --workers "$WORKERS" 2>&1 | tee "$OUT/train.log"
