#!/usr/bin/env bash
# The GPU recipes (cifar10-gpu, fmnist-best-gpu) side by side on one GPU, then `moderncnn bench` on it.
#
# Each run gets TRAIN_SECONDS of training and evaluation (--budget plans its epochs from measured times);
# the exact training commands are printed. Everything lands in $OUT:
# gpu_recipes.log (this script's output), one <run>.tar.gz per run (report, curves, metrics, best.pt,
# training log) and bench.txt.
#
#   DATA=dir-with-cifar10-jpg.tar.gz-and-fashion-mnist/ OUT=/tmp/gpu bash benchmarks/gpu_recipes.sh
#
# Environment: TRAIN_SECONDS (default 300), DEVICE (cuda; "cpu" rehearses the script with SUBSET images
# and no autocast), SUBSET (default: all), MAX_EPOCHS (default 100), BENCH (1: run the benchmark),
# PYTHON (default python3), BATCH (default 512, the recipes').
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-.devdata}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
DEVICE=${DEVICE:-cuda}
SUBSET=${SUBSET:-}
MAX_EPOCHS=${MAX_EPOCHS:-100}
BENCH=${BENCH:-1}
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-512}  # the recipes' batch; a CPU rehearsal needs a smaller one
RUNS=${RUNS:-/tmp/gpu-runs}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODERNCNN_CACHE=${MODERNCNN_CACHE:-/tmp/moderncnn-cache}
mkdir -p "$OUT" "$RUNS"
main() {

echo "== $(date -u +%FT%TZ) $(hostname)"
{ nvidia-smi -L || true; } 2>/dev/null
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

mkdir -p /tmp/cifar10-jpg
tar xzf "$DATA/cifar10-jpg.tar.gz" -C /tmp/cifar10-jpg || return 1
CIFAR=/tmp/cifar10-jpg
[ -d "$CIFAR/train" ] || CIFAR=$(dirname "$(find /tmp/cifar10-jpg -maxdepth 3 -type d -name train | head -1)")
echo "CIFAR-10 JPEG copy at $CIFAR"

AMP_FLAGS=()
[ "$DEVICE" = cpu ] && AMP_FLAGS=(--no-amp)
SUBSET_FLAGS=()
[ -n "$SUBSET" ] && SUBSET_FLAGS=(--subset "$SUBSET")
[ "$BATCH" != 512 ] && SUBSET_FLAGS+=(--batch-size "$BATCH")

# Each run plans its epochs to fill TRAIN_SECONDS (--budget: the schedule ends with the budget; both runs
# measure their epochs while sharing the GPU, as they train). MAX_EPOCHS caps them.
CMD_CIFAR=("$PYTHON" -m moderncnn train --recipe cifar10-gpu --dataset imagefolder --data-dir "$CIFAR"
           --budget "$TRAIN_SECONDS" --epochs "$MAX_EPOCHS" --device "$DEVICE" --out "$RUNS" --name cifar10-gpu --no-progress
           "${AMP_FLAGS[@]}" "${SUBSET_FLAGS[@]}")
CMD_FMNIST=("$PYTHON" -m moderncnn train --recipe fmnist-best-gpu --data-dir "$DATA/fashion-mnist"
            --budget "$TRAIN_SECONDS" --epochs "$MAX_EPOCHS" --device "$DEVICE" --out "$RUNS" --name fmnist-best-gpu --no-progress
            "${AMP_FLAGS[@]}" "${SUBSET_FLAGS[@]}")
echo "== $(date -u +%T) training, side by side:"
echo "   ${CMD_CIFAR[*]}"
echo "   ${CMD_FMNIST[*]}"
HARD_LIMIT=$((TRAIN_SECONDS * 3 / 2 + 60))  # SIGTERM: the run saves last.pt and stops
start=$(date +%s)
timeout "$HARD_LIMIT" "${CMD_CIFAR[@]}" > "$RUNS/cifar10-gpu.log" 2>&1 &
timeout "$HARD_LIMIT" "${CMD_FMNIST[@]}" > "$RUNS/fmnist-best-gpu.log" 2>&1 &
wait
echo "== $(date -u +%T) both done in $(( $(date +%s) - start )) s"
for run in cifar10-gpu fmnist-best-gpu; do
  echo "--- $run"
  grep -E "^(training|epoch|time budget|final|Traceback|.*Error)" "$RUNS/$run.log" | tail -n 25
  [ -d "$RUNS/$run" ] && cp "$RUNS/$run.log" "$RUNS/$run/train.log"
  [ -d "$RUNS/$run" ] && tar czf "$OUT/$run.tar.gz" -C "$RUNS" --exclude=last.pt "$run"
done

if [ "$BENCH" = 1 ] && [ "$DEVICE" = cuda ]; then
  echo "== $(date -u +%T) moderncnn bench --device cuda --amp --channels-last --batch 256 --steps 20"
  timeout 100 "$PYTHON" -m moderncnn bench --device cuda --amp --channels-last --batch 256 --eval-batch 512 \
      --steps 20 --repeats 3 2>&1 | tee "$OUT/bench.txt"
fi
echo "== $(date -u +%T) end"
}
main 2>&1 | tee "$OUT/gpu_recipes.log"
