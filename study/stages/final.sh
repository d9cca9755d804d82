#!/usr/bin/env bash
# Stage 2 of a pre-registered study: none and each method's selected configuration (study/analysis/selection.py
# on the grid of study/stages/grid.sh) on worlds 1-10, never used in calibration or tuning; one experiment folder
# in which each cell keeps its own config.json.
#   study/stages/final.sh none            builds worlds 1-10 and runs their `none` cells
#   study/stages/final.sh METHOD [FLAGS]  the method's cells, each as soon as its world's `none` cell is done
#   study/stages/final.sh table [FLAGS]   the table from the finished cells: runs/study/final/experiment.md
#                                         (FLAGS: the cells' --prime-seeds / --finetune-seeds: they count as finished)
# FIRST=11 (N=10) runs the same on worlds 11-20 instead: the replication; FIRST=1 N=20 table pools both. P=2: two
# worlds at a time. TESTBED= and OUT= put the worlds and cells elsewhere (default runs/study/testbed, runs/study/final).
# Cell by cell (--seed s --seeds 1) so that several methods can run side by side as worlds become ready; the same
# computation as one --seeds 10 call (cells are independent; --jobs 2 is bit-identical to --jobs 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
FIRST=${FIRST:-1} N=${N:-10} TESTBED=${TESTBED:-runs/study/testbed} OUT=${OUT:-runs/study/final}
COMMON="--per-world --testbed $TESTBED --prime-steps 60 --out $OUT"
if [ "$1" = table ]; then
    exec $PY study/experiment.py $COMMON --seed $FIRST --seeds $N --methods none,multitask,maml,prime "${@:2}"
fi
method=$1; shift
export PY COMMON OUT method
mkdir -p "$(dirname "$OUT")"
# P worlds at a time (default 1), each cell as soon as its world's `none` cell is done
seq $FIRST $((FIRST + N - 1)) | xargs -P "${P:-1}" -I {} bash -c '
    until [ "$method" = none ] || [ -f $OUT/seed{}/none/results.json ]; do sleep 10; done
    $PY study/experiment.py $COMMON --seed {} --seeds 1 --methods $method "$@" > $OUT-$method-{}.log 2>&1' _ "$@"
