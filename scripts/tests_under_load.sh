#!/usr/bin/env bash
# The tests that signal, kill, restart or race processes, RUNS times in a row beside HOGS busy-loop processes,
# on the same pytest-xdist workers as `make test`. A race that only shows on a loaded machine (a shared CI
# runner, a login node) fails here first.
#
#   bash scripts/tests_under_load.sh              # 3 runs beside 1 hog (what the README reports)
#   RUNS=5 HOGS=2 bash scripts/tests_under_load.sh
#   FILES="tests/test_reliability.py" RUNS=10 bash scripts/tests_under_load.sh
#
# One line per run (exit code, pytest's summary, load average); each run's whole pytest output is kept in
# $LOG_DIR/run<i>.log and its temporary files in $LOG_DIR/base<i>. Exits 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
HOGS=${HOGS:-1}
PYTHON=${PYTHON:-.venv/bin/python}
WORKERS=${PYTEST_WORKERS:-2}
FILES=${FILES:-"tests/test_train_e2e.py tests/test_reliability.py tests/test_multinode.py
  tests/test_multinode_correctness.py tests/test_slurm_requeue.py tests/test_data_shards_e2e.py
  tests/test_data_ffcv.py tests/test_eval.py"}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t tests_under_load.XXXXXX)}
mkdir -p "$LOG_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

hogs=()
for _ in $(seq 1 "$HOGS"); do
  "$PYTHON" -c "while True: pass" &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
export TESTS_UNDER_LOAD_HOGS="${hogs[*]}"  # tests/test_tests_under_load.py checks they burn CPU

echo "$RUNS runs beside $HOGS CPU hog(s), $WORKERS workers; logs in $LOG_DIR"
failed=0
for i in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2086  # FILES is a list of paths
  "$PYTHON" -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadfile -rfE -m "slow or not slow" \
    --basetemp="$LOG_DIR/base$i" $FILES > "$LOG_DIR/run$i.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  echo "run $i: exit $rc, $(tail -n 1 "$LOG_DIR/run$i.log"), load $(cut -d' ' -f1-3 /proc/loadavg)"
done
exit "$failed"
