#!/usr/bin/env bash
# v6 calibration (study/v6/PROTOCOL.md, section 1): `none` fine-tuned with Houlsby adapters, 3 sizes x 3 learning
# rates, on worlds 401-403 (used by nothing else), and `none -> lora` (the v5 recipe) on them for reference.
# Run it from a worktree of a fixed commit:
#   cd WORKTREE && PY=/path/to/python nohup setsid nice -n 10 bash study/v6/calibrate.sh > runs/v6-calibrate.log 2>&1 &
# Resumes: the same command again (finished cells are kept, a killed cell runs again from its start).
# Cells run world by world (all nine configurations of a world before the next), P=2 at a time, one thread each.
# Then: $PY study/v6/calibration.py runs/v6/calib   (the table and the selection rule)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
OUT=runs/v6/calib WORLDS="401 402 403" SIZES="16 32 64" LRS="1e-3 3e-3 1e-2"
COMMON="--per-world --testbed $OUT/testbed --methods none --threads 1"
mkdir -p $OUT
# 1. the three worlds (built here, two at a time) and their LoRA reference cells
$PY study/experiment.py $COMMON --seed 401 --seeds 3 --jobs ${P:-2} --out $OUT/lora > $OUT/lora.log 2>&1
# 2. the grid, one cell per process
export PY COMMON OUT
for w in $WORLDS; do for s in $SIZES; do for lr in $LRS; do echo $w $s $lr; done; done; done |
    xargs -P "${P:-2}" -L 1 bash -c '$PY study/experiment.py $COMMON --jobs 1 --seed $0 --seeds 1 --peft houlsby \
        --adapter-size $1 --finetune-lr $2 --out $OUT/houlsby-a$1-lr$2 > $OUT/houlsby-a$1-lr$2-$0.log 2>&1'
echo "calibration cells done: $PY study/v6/calibration.py $OUT"
