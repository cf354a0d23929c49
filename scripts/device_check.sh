#!/usr/bin/env bash
# Device check for a machine that already has jax, jaxlib and diffrax (e.g. a GPU image).
# Installs gradflow without touching jax (pip install --no-deps -e .; equinox, optimistix, optax,
# tqdm, matplotlib and pytest only if missing), prints `gradflow info`, runs the test suite that needs
# no display (MPLBACKEND=Agg, slow tests excluded) and the device benchmark, all in under ~5 minutes.
# Usage: scripts/device_check.sh [LOG]      (default log: ./device_check.log; DEVICE_CHECK_QUICK=1
#        runs the benchmark with --quick and only the sweep/sharding/flow/objective tests)
set -u
cd "$(dirname "$0")/.."
LOG="${1:-$PWD/device_check.log}"
PY="${PYTHON:-python}"
QUICK="${DEVICE_CHECK_QUICK:-0}"
export MPLBACKEND=Agg
: > "$LOG"
echo "device_check: writing $LOG"
run() { echo "+ $*" | tee -a "$LOG"; timeout "${STEP_TIMEOUT:-240}" "$@" >> "$LOG" 2>&1; local rc=$?; echo "  exit $rc" | tee -a "$LOG"; return $rc; }

status=0
"$PY" -c "import jax, jaxlib, diffrax" >> "$LOG" 2>&1 || { echo "jax/jaxlib/diffrax missing" | tee -a "$LOG"; exit 2; }
for mod in equinox optimistix optax tqdm matplotlib pytest; do
  "$PY" -c "import $mod" 2>/dev/null || run "$PY" -m pip install --quiet "$mod" || status=1
done
"$PY" -c "import gradflow" 2>/dev/null || run "$PY" -m pip install --quiet --no-deps -e . || status=1
run "$PY" -m gradflow.cli info || status=1
if [ "$QUICK" = 1 ]; then
  run "$PY" -m pytest -q -p no:cacheprovider tests/test_sweep.py tests/test_sharding.py tests/test_objective.py || status=1
  run "$PY" benchmarks/bench_devices.py --quick || status=1
else
  run "$PY" -m pytest -q -p no:cacheprovider -x tests || status=1
  run "$PY" benchmarks/bench_devices.py || status=1
fi
tail -n 25 "$LOG"
echo "device_check: status $status, log $LOG"
exit $status
