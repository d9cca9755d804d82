#!/usr/bin/env bash
# The pilot of study v4 (study/README.md): on worlds 201-203, used for nothing else, v3's selected configurations
# unchanged, every cell as 2 priming runs x 2 fine-tuning runs (none: 2 fine-tuning runs), so that a cell's variance
# splits into world, priming run and fine-tuning run (study/variance.py). All chains side by side, as final.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export TESTBED=${TESTBED:-runs/pilot/testbed} OUT=${OUT:-runs/pilot/cells} FIRST=${FIRST:-201} N=${N:-3}
RUNS="--prime-seeds 2 --finetune-seeds 2"
P=2 study/final.sh none $RUNS &
study/final.sh prime --prime-lr 1e-3 --inner-opt adam --inner-steps 20 --support-batches 20 --first-order $RUNS &
study/final.sh maml --prime-lr 1e-3 --inner-opt adam --inner-steps 5 --first-order $RUNS &
study/final.sh multitask --prime-lr 3e-3 $RUNS &
wait
study/final.sh table $RUNS
