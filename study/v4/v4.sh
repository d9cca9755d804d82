#!/usr/bin/env bash
# Study v4 (study/README.md, pre-registered): worlds 1001-1060, used for nothing else, v3's selected configurations
# unchanged (every flag in which they differ from today's defaults spelled out), one run per cell; all four chains
# side by side, as final.sh. Its pilot ran the same on worlds 201-203 with every cell as 2 priming x 2 fine-tuning
# runs:  FIRST=201 N=3 TESTBED=runs/pilot/testbed OUT=runs/pilot/cells RUNS="--prime-seeds 2 --finetune-seeds 2"
set -euo pipefail
cd "$(dirname "$0")/.."
export TESTBED=${TESTBED:-runs/v4/testbed} OUT=${OUT:-runs/v4/cells} FIRST=${FIRST:-1001} N=${N:-60}
RUNS=${RUNS:-}
P=2 study/final.sh none $RUNS &
study/final.sh prime --prime-lr 1e-3 --inner-opt adam --inner-lr 5e-3 --inner-steps 20 --support-batches 20 \
    --first-order $RUNS &
study/final.sh maml --prime-lr 1e-3 --inner-opt adam --inner-lr 5e-3 --inner-steps 5 --support-batches 1 \
    --first-order $RUNS &
study/final.sh multitask --prime-lr 3e-3 --inner-opt sgd --inner-steps 1 --support-batches 1 $RUNS &
wait
study/final.sh table $RUNS
