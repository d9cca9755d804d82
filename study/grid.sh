#!/usr/bin/env bash
# Stage 1 of the pre-registered study (README, "Does priming work?"): the tuning grid on the development world
# (testbed seed 0), four configurations per priming method, 60 meta-steps each, 2 cells at a time on 2 cores.
# Then `python study/select.py runs/study/grid` picks each method's configuration by the selection metric.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1  # one thread per process: two processes with two threads each stall on 2 cores
COMMON="--stage experiment --per-world --seed 0 --seeds 1 --testbed runs/study/testbed --prime-steps 60"
mkdir -p runs/study/grid
$PY train.py $COMMON --methods none --out runs/study/grid/none > runs/study/grid/none.log 2>&1  # builds world 0
ADAM="--inner-opt adam --inner-steps 5 --first-order"  # 5 AdamW steps at the downstream lr (--finetune-lr)
xargs -P 2 -L 1 bash -c "$PY"' train.py '"$COMMON"' --out runs/study/grid/$0 "$@" \
    > runs/study/grid/$0.log 2>&1' <<LIST
prime-sgd-1e-4 --methods prime --prime-lr 1e-4
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
multitask-1e-3 --methods multitask --prime-lr 1e-3
LIST
