#!/usr/bin/env bash
# `make demo`: the mini-project's deliverables in one command. Trains the plain baseline
# (configs/defects_baseline.yaml) and the default recipe (configs/defects.yaml: the
# imbalance remedy), compares the two per class, and names the report of each.
#
# The two runs are independent, so they train side by side, one torch thread each
# (DEMO_THREADS): on a 2-core machine that takes about half the time of one after the
# other. Each run's console output goes to its own log (printed when it fails).
#
# Extra key=value arguments go to both runs (the test passes a tiny budget). Runs live in
# run.dir (default runs/) as demo-baseline and demo-default; a second `make demo` finds
# them finished and only compares again (delete them to train anew).
set -euo pipefail
VT="${VISIONTRAIN:-.venv/bin/visiontrain}"
RUNS="${DEMO_RUNS:-runs}"
THREADS="${DEMO_THREADS:-1}"
start=$(date +%s)
mkdir -p "$RUNS"
pids=()
names=()
# Ctrl-C or a failure stops both trainings (each saves and exits on SIGTERM).
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for pair in "baseline:configs/defects_baseline.yaml" "default:configs/defects.yaml"; do
    name="${pair%%:*}"
    config="${pair#*:}"
    echo "== training the ${name} (${config}); console output: $RUNS/demo-$name.log"
    OMP_NUM_THREADS="$THREADS" "$VT" train "$config" "run.dir=$RUNS" "run.name=demo-$name" \
        run.resume=auto train.progress=plain "$@" >"$RUNS/demo-$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
done
failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "== ${names[$i]} trained: $(grep -m1 '^test:' "$RUNS/demo-${names[$i]}.log" || true)"
    else
        code=$?
        # The first failure is the one reported; the runs stopped after it saved and
        # exited on the SIGTERM sent here, and are not failures of their own.
        if [ "$failed" -eq 0 ]; then
            echo "error: the ${names[$i]} run failed (exit $code); the end of its log:" >&2
            tail -n 20 "$RUNS/demo-${names[$i]}.log" >&2
            failed=$code
            kill "${pids[@]}" 2>/dev/null || true
        fi
    fi
done
if [ "$failed" -ne 0 ]; then
    exit "$failed"
fi
echo "== test split, baseline vs default (per-class precision and recall before and after)"
"$VT" compare "$RUNS/demo-baseline" "$RUNS/demo-default"
echo "reports (curves with the best checkpoint, per-class figures):"
echo "  $RUNS/demo-baseline/report.html"
echo "  $RUNS/demo-default/report.html"
echo "demo took $(( $(date +%s) - start )) s"
