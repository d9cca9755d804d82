#!/usr/bin/env bash
# Calibration check: the `none` procedure on an untrained encoder of the same shape, on worlds given as arguments
# (already built by grid.sh / final.sh, or in TESTBED=...). Tables in runs/study/random-<seed>/experiment.md (OUT=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
TESTBED=${TESTBED:-runs/study/testbed} OUT=${OUT:-runs/study/random}
for s in "$@"; do
    [ -f $OUT-$s/encoder/model/model.safetensors ] || \
        $PY train.py --stage pretrain --pretrain-steps 0 --data $TESTBED-$s/data --out $OUT-$s/encoder
    $PY study/experiment.py --methods none --model $OUT-$s/encoder/model \
        --data $TESTBED-$s/data --seed $s --seeds 1 --out $OUT-$s
done
