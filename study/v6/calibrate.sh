#!/usr/bin/env bash
# v6 calibration (study/v6/PROTOCOL.md, section 1): `none` fine-tuned with Houlsby adapters, 3 sizes x 3 learning
# rates, on worlds 401-403 (used by nothing else), and `none -> lora` (the v5 recipe) on them for reference.
# Run it from a worktree of a fixed commit:
#   cd WORKTREE && PY=/path/to/python nohup setsid nice -n 10 bash study/v6/calibrate.sh > runs/v6-calibrate.log 2>&1 &
# Resumes: the same command again (finished cells are kept, a killed cell runs again from its start).
# Cells run world by world (a world's LoRA cell builds it, one world ahead; then its nine configurations), P=2 at a
# time, one thread each; each cell is an experiment folder of its own, runs/v6/calib/CONFIG/WORLD (two processes
# never write one folder's files). The order changes no number.
# Then: $PY -m study.v6.calibration runs/v6/calib   (the table and the selection rule)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
OUT=runs/v6/calib WORLDS=(401 402 403) SIZES="16 32 64" LRS="1e-3 3e-3 1e-2"
export PY OUT COMMON="--per-world --testbed $OUT/testbed --methods none --threads 1 --jobs 1 --seeds 1"
mkdir -p $OUT
{
    echo "${WORLDS[0]} lora"
    for i in "${!WORLDS[@]}"; do
        [ $((i + 1)) -lt ${#WORLDS[@]} ] && echo "${WORLDS[i + 1]} lora"
        for s in $SIZES; do for lr in $LRS; do echo "${WORLDS[i]} houlsby $s $lr"; done; done
    done
} | xargs -P "${P:-2}" -L 1 bash -c '
    w=$0
    if [ $1 = lora ]; then  # the v5 recipe, for reference: it builds the world
        exec $PY study/experiment.py $COMMON --seed $w --out $OUT/lora/$w > $OUT/lora-$w.log 2>&1
    fi
    until [ -f $OUT/testbed-$w/pretrain/model/tokenizer.json ]; do sleep 20; done
    $PY study/experiment.py $COMMON --seed $w --peft houlsby --adapter-size $2 --finetune-lr $3 \
        --out $OUT/houlsby-a$2-lr$3/$w > $OUT/houlsby-a$2-lr$3-$w.log 2>&1'
echo "calibration cells done: $PY -m study.v6.calibration $OUT"
