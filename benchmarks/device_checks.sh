#!/usr/bin/env bash
# The GPU checks of issue #12 as one prepared command for a lent GPU machine (docs/benchmarks.md says how to call it).
#
#   bash benchmarks/device_checks.sh STAGE...      STAGE: env, goal, methods, fmnist, tests (default: all five)
#
# Every stage writes its own files under $OUT and stops at its own time limit (goal 200 s, methods 150 s, fmnist
# 100 s, tests 150 s: 600 s of the 15 device minutes a session is lent, leaving time to start the machine and rerun
# a stage), so a call brings back whatever it reached; all five in one call write 8 files, the most a call brings back. Environment: OUT (default /tmp/mbq-device), DEVICE (default cuda; cpu for a dry run), TRAIN_SUBSET
# (train on fewer images: dry runs), FMNIST_ROOT (default .data/fashion-mnist, else the Debian package's folder),
# COMMIT (default: .commit, written by the caller, since the copy sent to the machine has no git history).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/mbq-device}
DEVICE=${DEVICE:-cuda}
COMMIT=${COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
FMNIST_ROOT=${FMNIST_ROOT:-$( [ -d .data/fashion-mnist ] && echo .data/fashion-mnist || echo /usr/share/datasets/fashion-mnist)}
PY=${PY:-python3}
mkdir -p "$OUT"
subset=()
[ -n "${TRAIN_SUBSET:-}" ] && subset=(--train-subset "$TRAIN_SUBSET")
# the native and compiled quantizer kernels serve float32 CPU tensors only: on a GPU they would be built for nothing
cpu_kernels=()
[ "$DEVICE" != cpu ] && cpu_kernels=(MBQ_NATIVE_KERNELS=0 MBQ_FUSED_KERNELS=0)
table=(env "${cpu_kernels[@]}" "$PY" benchmarks/epoch_table.py --device "$DEVICE" --commit "$COMMIT" "${subset[@]}")

stage_env() {
  { date -u; nvidia-smi -L 2>&1; timeout 60 "$PY" -c 'import torch, sys; print(sys.version.split()[0], torch.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA", torch.get_num_threads(), "threads")'
  } >"$OUT/env.txt" 2>&1
}

# The issue's goal cell: Any-Precision at bits 2,4,8 on 50,000 32x32 images, bf16, data on the device, compile off
# and on, with the full-precision reference under the same settings.
stage_goal() {
  timeout 200 "${table[@]}" --datasets cifar-size --methods fp,anyprecision --amp bf16 --compile off,on \
    --data-on device --budget-seconds 140 --out "$OUT/epoch-goal.md" >"$OUT/epoch-goal.log" 2>&1
}

# Every method, fp32 and bf16, eager, data on the device. EMQ last: before its two timed epochs it scores the
# training set (three epochs per bit-width), which would otherwise use up the budget of the cells after it.
stage_methods() {
  timeout 150 "${table[@]}" --datasets cifar-size --methods fp,anyprecision,dedicated,adabits,mbquant,emq \
    --amp bf16,off --data-on device --budget-seconds 100 --out "$OUT/epoch-methods.md" >"$OUT/epoch-methods.log" 2>&1
}

# All of Fashion-MNIST (60,000 28x28 images), every method, bf16, data on the device and on the host.
stage_fmnist() {
  timeout 100 "${table[@]}" --datasets fashion-mnist --data-root "$FMNIST_ROOT" \
    --methods fp,anyprecision,dedicated,adabits,mbquant,emq --amp bf16 --data-on device,host --budget-seconds 60 \
    --out "$OUT/epoch-fmnist.md" >"$OUT/epoch-fmnist.log" 2>&1
}

# The test suite on the GPU machine: the CUDA-only tests run there (they skip on CPU-only machines).
# The CUDA-only tests first, then the whole suite, verbose so that a timeout still shows which tests passed and
# failed: its fixtures train on the CPU, so it shows that the package runs under the machine's own torch.
stage_tests() {
  { echo "== tests/harness/test_runtime.py"; timeout 40 "$PY" -m pytest -q -rs tests/harness/test_runtime.py \
      -p no:cacheprovider; } >"$OUT/tests.txt" 2>&1
  local cuda=$?
  { echo "== tests"; timeout 110 "$PY" -m pytest -v -rfEs --tb=short tests -p no:cacheprovider; } >>"$OUT/tests.txt" 2>&1
  local all=$?
  return $(( cuda || all ))
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env goal methods fmnist tests)
status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    env|goal|methods|fmnist|tests) echo "== $stage ($(date -u +%H:%M:%S))"; "stage_$stage" || { echo "   $stage: exit $?"; status=1; } ;;
    *) echo "error: unknown stage $stage (env, goal, methods, fmnist, tests)" >&2; exit 2 ;;
  esac
done
exit $status
