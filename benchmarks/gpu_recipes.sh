#!/usr/bin/env bash
# The GPU recipes (cifar10-gpu, fmnist-best-gpu) side by side on one GPU, then `moderncnn bench` on it.
#
# A short throughput probe of each recipe's network (both at once, as they will train) sizes each run to
# TRAIN_SECONDS of training; the exact training commands are printed. Everything lands in $OUT:
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

# --- probe: training images/s of each recipe's network, both processes at once -------------------------
probe() {  # name model in_chans side batch
  "$PYTHON" - "$@" <<'EOF'
import json, sys, torch
from moderncnn.bench import measure
name, model, chans, side, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.backends.cudnn.benchmark = True
r = measure("moderncnn", model, "train", (chans, side, side), batch, device=device, steps=10 if device == "cpu" else 30,
            warmup=3 if device == "cpu" else 10, amp=device == "cuda", channels_last=True, repeats=2)
print(json.dumps({"name": name, **r}))
EOF
}
probe cifar10-gpu densenet_bc_100 3 32 "$BATCH" "$DEVICE" > "$RUNS/probe-cifar.json" &
probe fmnist-best-gpu densenet_bc_100 1 28 "$BATCH" "$DEVICE" > "$RUNS/probe-fmnist.json" &
wait
cat "$RUNS"/probe-*.json
grep -q images_per_second "$RUNS/probe-cifar.json" && grep -q images_per_second "$RUNS/probe-fmnist.json" || return 1

# Epochs that fit TRAIN_SECONDS: an epoch costs its training images at the probed rate, plus the test
# set's evaluation (a forward pass, about a third of a training step per image) and ~10% for augmentation,
# EMA and bookkeeping.
epochs_for() {  # probe.json train_images test_images
  "$PYTHON" -c "
import json, sys
ips = json.load(open('$1'))['images_per_second']
per_epoch = ($2 * 1.1 + $3 / 3) / ips
print(max(1, min($MAX_EPOCHS, int($TRAIN_SECONDS / per_epoch))))"
}
N_CIFAR=${SUBSET:-50000}; N_FMNIST=${SUBSET:-60000}
E_CIFAR=$(epochs_for "$RUNS/probe-cifar.json" "$N_CIFAR" 10000)
E_FMNIST=$(epochs_for "$RUNS/probe-fmnist.json" "$N_FMNIST" 10000)

CMD_CIFAR=("$PYTHON" -m moderncnn train --recipe cifar10-gpu --dataset imagefolder --data-dir "$CIFAR"
           --epochs "$E_CIFAR" --device "$DEVICE" --out "$RUNS" --name cifar10-gpu --no-progress
           "${AMP_FLAGS[@]}" "${SUBSET_FLAGS[@]}")
CMD_FMNIST=("$PYTHON" -m moderncnn train --recipe fmnist-best-gpu --data-dir "$DATA/fashion-mnist"
            --epochs "$E_FMNIST" --device "$DEVICE" --out "$RUNS" --name fmnist-best-gpu --no-progress
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
