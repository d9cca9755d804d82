#!/usr/bin/env bash
# Study v4's scheduling helper (it changes no result: a cell is the same computation whichever process runs it).
# v4.sh runs each method's cells one world after another, and `prime` cells take the longest, so its chain would
# end last, alone on one core. This second `prime` chain runs, with exactly v4.sh's flags, the highest world whose
# `none` cell is done and whose `prime` cell is not, but only 3 or more worlds above the lowest unfinished `prime`
# cell (where v4.sh's chain is), so the two chains never run the same cell; v4.sh's chain skips the cells it finds done.
# FIRST= (default 1001): the first world of this machine's share (v4.sh's FIRST).
#   cd WORKTREE_OF_528169d && FIRST=1029 PY=/path/to/python nohup nice -n 10 bash /path/to/main/study/v4-prime-down.sh &
set -uo pipefail
PY=${PY:-.venv/bin/python} OUT=runs/v4/cells FIRST=${FIRST:-1001} LAST=1060
export OMP_NUM_THREADS=1
has() { [ -f $OUT/seed$1/$2/results.json ]; }
while true; do
    low=$FIRST; while [ $low -le $LAST ] && has $low prime; do low=$((low + 1)); done
    [ $((low + 3)) -le $LAST ] || break
    s=""; for w in $(seq $LAST -1 $((low + 3))); do has $w none && ! has $w prime && { s=$w; break; }; done
    if [ -z "$s" ]; then sleep 60; continue; fi
    $PY train.py --stage experiment --per-world --testbed runs/v4/testbed --prime-steps 60 --out $OUT --seed $s \
        --seeds 1 --methods prime --prime-lr 1e-3 --inner-opt adam --inner-lr 5e-3 --inner-steps 20 \
        --support-batches 20 --first-order > $OUT-prime-$s.log 2>&1 || exit 1
done
