#!/usr/bin/env bash
# `make demo`: the mini-project's deliverables in one command. Trains the plain baseline
# (configs/defects_baseline.yaml) and the default recipe (configs/defects.yaml: the
# imbalance remedy), compares the two per class, and names the report of each.
#
# Extra key=value arguments go to both runs (the test passes a tiny budget). Runs live in
# run.dir (default runs/) as demo-baseline and demo-default; a second `make demo` finds
# them finished and only compares again (delete them to train anew).
set -euo pipefail
VT="${VISIONTRAIN:-.venv/bin/visiontrain}"
RUNS="${DEMO_RUNS:-runs}"
start=$(date +%s)
for pair in "baseline:configs/defects_baseline.yaml" "default:configs/defects.yaml"; do
    name="${pair%%:*}"
    config="${pair#*:}"
    echo "== training the ${name} (${config})"
    "$VT" train "$config" "run.dir=$RUNS" "run.name=demo-$name" run.resume=auto "$@"
done
echo "== test split, baseline vs default (per-class precision and recall before and after)"
"$VT" compare "$RUNS/demo-baseline" "$RUNS/demo-default"
echo "reports (curves with the best checkpoint, per-class figures):"
echo "  $RUNS/demo-baseline/report.html"
echo "  $RUNS/demo-default/report.html"
echo "demo took $(( $(date +%s) - start )) s"
