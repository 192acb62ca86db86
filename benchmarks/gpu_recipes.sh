#!/usr/bin/env bash
# The GPU recipes (cifar10-gpu, fmnist-best-gpu, or those in RECIPES) side by side on one GPU, then
# `moderncnn bench` on it (and, with PROBE=1, benchmarks/gpu_probe.py before them).
#
# Each run gets TRAIN_SECONDS of training and evaluation (--budget plans its epochs from measured times);
# the exact training commands are printed. Everything lands in $OUT:
# gpu_recipes.log (this script's output), one <run>.tar.gz per run (report, curves, metrics, best.pt with --val-split,
# training log) and bench.txt.
#
#   DATA=dir-with-cifar10-jpg.tar.gz-and-fashion-mnist/ OUT=/tmp/gpu bash benchmarks/gpu_recipes.sh
#
# Environment: TRAIN_SECONDS (default 300), DEVICE (cuda; "cpu" rehearses the script with SUBSET images
# and no autocast), SUBSET (default: all), MAX_EPOCHS (default 100), BENCH (1: run the benchmark),
# HARD_LIMIT (seconds before a run is stopped; default 1.5 x TRAIN_SECONDS + 60), PROBE (1: first run benchmarks/gpu_probe.py, our step against torchvision's, ~1 minute),
# RECIPES (default "cifar10-gpu fmnist-best-gpu"; several run side by side), FLAGS (more `train` flags for
# every run, e.g. "--optimizer muon"), PYTHON (default python3), BATCH (default 512, the recipes').
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
PROBE=${PROBE:-0}
RECIPES=${RECIPES:-cifar10-gpu fmnist-best-gpu}
read -r -a EXTRA_FLAGS <<< "${FLAGS:-}"
RUNS=${RUNS:-/tmp/gpu-runs}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODERNCNN_CACHE=${MODERNCNN_CACHE:-/tmp/moderncnn-cache}
mkdir -p "$OUT" "$RUNS"
main() {

echo "== $(date -u +%FT%TZ) $(hostname)"
{ nvidia-smi -L || true; } 2>/dev/null
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

if [ "$PROBE" = 1 ]; then
  echo "== $(date -u +%T) benchmarks/gpu_probe.py"
  timeout 150 "$PYTHON" benchmarks/gpu_probe.py --device "$DEVICE" --batch "$BATCH" --out "$OUT/gpu_probe.txt"
fi

CIFAR=/tmp/cifar10-jpg
if [[ " $RECIPES" == *" cifar10"* ]]; then  # the JPEG copy, extracted only for a CIFAR-10 run
  mkdir -p "$CIFAR"
  tar xzf "$DATA/cifar10-jpg.tar.gz" -C "$CIFAR" || return 1
  [ -d "$CIFAR/train" ] || CIFAR=$(dirname "$(find /tmp/cifar10-jpg -maxdepth 3 -type d -name train | head -1)")
  echo "CIFAR-10 JPEG copy at $CIFAR"
fi

COMMON=(--budget "$TRAIN_SECONDS" --epochs "$MAX_EPOCHS" --device "$DEVICE" --out "$RUNS" --no-progress)
[ "$DEVICE" = cpu ] && COMMON+=(--no-amp)
[ -n "$SUBSET" ] && COMMON+=(--subset "$SUBSET")
[ "$BATCH" != 512 ] && COMMON+=(--batch-size "$BATCH")
COMMON+=("${EXTRA_FLAGS[@]}")

# Each run plans its epochs to fill TRAIN_SECONDS (--budget: the schedule ends with the budget; runs side by
# side measure their epochs while sharing the GPU, as they train). MAX_EPOCHS caps them.
HARD_LIMIT=${HARD_LIMIT:-$((TRAIN_SECONDS * 3 / 2 + 60))}  # SIGTERM: the run saves last.pt and stops
echo "== $(date -u +%T) training, side by side:"
start=$(date +%s)
for recipe in $RECIPES; do
  case $recipe in
    cifar10*) DATA_FLAGS=(--dataset imagefolder --data-dir "$CIFAR") ;;
    *) DATA_FLAGS=(--data-dir "$DATA/fashion-mnist") ;;
  esac
  cmd=("$PYTHON" -m moderncnn train --recipe "$recipe" "${DATA_FLAGS[@]}" --name "$recipe" "${COMMON[@]}")
  echo "   ${cmd[*]}"
  timeout "$HARD_LIMIT" "${cmd[@]}" > "$RUNS/$recipe.log" 2>&1 &
done
wait
echo "== $(date -u +%T) all done in $(( $(date +%s) - start )) s"
for run in $RECIPES; do
  echo "--- $run"
  grep -E "^(training|epoch|time budget|final|Traceback|.*Error)" "$RUNS/$run.log" | tail -n 60
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
