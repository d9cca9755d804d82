#!/usr/bin/env bash
# Study v5 (study/README.md, 3.8, pre-registered): `prime` against `multitask` on worlds 2001-2160, used for nothing
# else, with v4's code and configurations unchanged (run it in a worktree of 528169d; the flags are v4.sh's), one
# run per cell, `none` for the secondary comparison and to build each world, no `maml`. `prime` cells take the
# longest, so their chain runs two worlds at a time, as `none`'s does.
#   cd WORKTREE_OF_528169d && PY=/path/to/python nohup bash /path/to/main/study/v5.sh > v5.log 2>&1 &
# After a stop: the same command with FIRST=F N=$((2161 - F)) from the lowest unfinished world F (finished cells
# are kept, killed ones resume from their checkpoints); on a new machine restore the cells first (cells.py).
set -euo pipefail
export TESTBED=runs/v5/testbed OUT=runs/v5/cells FIRST=${FIRST:-2001} N=${N:-160}
P=2 study/final.sh none &
P=2 study/final.sh prime --prime-lr 1e-3 --inner-opt adam --inner-lr 5e-3 --inner-steps 20 --support-batches 20 \
    --first-order &
study/final.sh multitask --prime-lr 3e-3 --inner-opt sgd --inner-steps 1 --support-batches 1 &
wait
