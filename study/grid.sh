#!/usr/bin/env bash
# Stage 1 of a pre-registered study (README, "Does priming work?"): the tuning grid on the development world
# (testbed seed 0), four configurations per priming method, 60 meta-steps each, 2 cells at a time on 2 cores.
# Then `python study/select.py runs/study/grid` (or runs/study/grid2) picks each method's configuration.
#   study/grid.sh       the first study's grid, in runs/study/grid
#   study/grid.sh v2    the follow-up's grid (larger outer lr, a 20-step inner loop), in runs/study/grid2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1  # one thread per process: two processes with two threads each stall on 2 cores
COMMON="--stage experiment --per-world --seed 0 --seeds 1 --testbed runs/study/testbed --prime-steps 60"
ADAM="--inner-opt adam --inner-steps 5 --first-order"  # 5 AdamW steps at the downstream lr (--finetune-lr)
# 20 AdamW steps, each on a new support batch of 8 sentences (160 per task), as real fine-tuning sees new batches
ADAM20="--inner-opt adam --inner-steps 20 --support-batches 20 --first-order"
if [ "${1:-v1}" = v2 ]; then
    dir=runs/study/grid2
    grid="prime-adam5-1e-3 --methods prime --prime-lr 1e-3 $ADAM
prime-adam5-3e-3 --methods prime --prime-lr 3e-3 $ADAM
prime-adam20-1e-3 --methods prime --prime-lr 1e-3 $ADAM20
prime-adam20-3e-3 --methods prime --prime-lr 3e-3 $ADAM20
maml-adam5-1e-3 --methods maml --prime-lr 1e-3 $ADAM
maml-adam5-3e-3 --methods maml --prime-lr 3e-3 $ADAM
maml-adam20-1e-3 --methods maml --prime-lr 1e-3 $ADAM20
maml-adam20-3e-3 --methods maml --prime-lr 3e-3 $ADAM20
multitask-3e-4 --methods multitask --prime-lr 3e-4
multitask-1e-3 --methods multitask --prime-lr 1e-3
multitask-3e-3 --methods multitask --prime-lr 3e-3
multitask-1e-2 --methods multitask --prime-lr 1e-2"
else
    dir=runs/study/grid
    grid="prime-sgd-1e-4 --methods prime --prime-lr 1e-4
prime-sgd-3e-4 --methods prime --prime-lr 3e-4
prime-adam-1e-4 --methods prime --prime-lr 1e-4 $ADAM
prime-adam-3e-4 --methods prime --prime-lr 3e-4 $ADAM
maml-sgd-1e-4 --methods maml --prime-lr 1e-4
maml-sgd-3e-4 --methods maml --prime-lr 3e-4
maml-adam-1e-4 --methods maml --prime-lr 1e-4 $ADAM
maml-adam-3e-4 --methods maml --prime-lr 3e-4 $ADAM
multitask-3e-5 --methods multitask --prime-lr 3e-5
multitask-1e-4 --methods multitask --prime-lr 1e-4
multitask-3e-4 --methods multitask --prime-lr 3e-4
multitask-1e-3 --methods multitask --prime-lr 1e-3"
fi
mkdir -p $dir
[ -f runs/study/grid/none/experiment.json ] ||  # builds world 0; the `none` cell of both grids
    $PY train.py $COMMON --methods none --out runs/study/grid/none > runs/study/grid/none.log 2>&1
echo "$grid" | xargs -P 2 -L 1 bash -c "$PY"' train.py '"$COMMON"' --out '"$dir"'/$0 "$@" > '"$dir"'/$0.log 2>&1'
