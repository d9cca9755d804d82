#!/usr/bin/env bash
# Stage 1 of a pre-registered study (README, "Does priming work?"): the tuning grid on the development world
# (testbed seed 0), four configurations per priming method, 60 meta-steps each, 2 cells at a time on 2 cores.
# Then `python -m study.analysis.selection runs/study/grid` (or runs/study/grid2) picks each method's configuration.
#   study/stages/grid.sh       the first study's grid, in runs/study/grid
#   study/stages/grid.sh v2    the follow-up's grid (larger outer lr, a 20-step inner loop), in runs/study/grid2
# TESTBED= and OUT= put world 0 and the grid (its `none` cell in OUT/none) elsewhere: study v3's new testbed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1  # one thread per process: two processes with two threads each stall on 2 cores
COMMON="--per-world --seed 0 --seeds 1 --testbed ${TESTBED:-runs/study/testbed} --prime-steps 60"
ADAM="--inner-opt adam --inner-steps 5 --first-order"  # 5 AdamW steps at the downstream lr (--finetune-lr)
# 20 AdamW steps, each on a new support batch of 8 sentences (160 per task), as real fine-tuning sees new batches
ADAM20="--inner-opt adam --inner-steps 20 --support-batches 20 --first-order"
# one cell a line, its name then its flags: prime and maml with each inner loop (name:flags) at each outer lr,
# multitask at each of its outer lrs
if [ "${1:-v1}" = v2 ]; then
    dir=runs/study/grid2 inner=("adam5:$ADAM" "adam20:$ADAM20") lrs="1e-3 3e-3" multitask_lrs="3e-4 1e-3 3e-3 1e-2"
else
    dir=runs/study/grid inner=("sgd:" "adam:$ADAM") lrs="1e-4 3e-4" multitask_lrs="3e-5 1e-4 3e-4 1e-3"
fi
grid=$(for m in prime maml; do for i in "${inner[@]}"; do for lr in $lrs; do
           echo "$m-${i%%:*}-$lr --methods $m --prime-lr $lr ${i#*:}"; done; done; done
       for lr in $multitask_lrs; do echo "multitask-$lr --methods multitask --prime-lr $lr"; done)
dir=${OUT:-$dir} none=${OUT:-runs/study/grid}/none  # by default the `none` cell of both grids is the first's
mkdir -p $dir
[ -f $none/experiment.json ] || $PY study/experiment.py $COMMON --methods none --out $none > $none.log 2>&1  # builds world 0
echo "$grid" | xargs -P 2 -L 1 bash -c "$PY"' study/experiment.py '"$COMMON"' --out '"$dir"'/$0 "$@" > '"$dir"'/$0.log 2>&1'
