#!/usr/bin/env bash
# Calibration check: the `none` procedure on an untrained encoder of the same shape, on worlds given as arguments
# (already built by grid.sh / final.sh). Tables in runs/study/random-<seed>/experiment.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
for s in "$@"; do
    $PY train.py --stage pretrain --pretrain-steps 0 --data runs/study/testbed-$s/data --out runs/study/random-$s/encoder
    $PY train.py --stage experiment --methods none --model runs/study/random-$s/encoder/model \
        --data runs/study/testbed-$s/data --seed $s --seeds 1 --out runs/study/random-$s
done
