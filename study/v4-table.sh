#!/usr/bin/env bash
# Study v4's table across changes of machine (3.7; a new machine starts without runs/). Each machine's worlds get
# their own table, results/v4-worlds-A-B.json (1001-1028: the first machine's), made here for the worlds from FIRST
# up to the last one whose four cells have all finished, with final.sh table's command on a copy of their
# results.json (the running study's folder is left alone); pool.py puts every such table together: results/v4.json
# once all 60 worlds are in, else results/v4-partial.json (descriptive only). Then: python study/verdict.py THAT.json
#   cd WORKTREE_OF_528169d && FIRST=1029 PY=/path/to/python bash /path/to/main/study/v4-table.sh
set -euo pipefail
PY=${PY:-.venv/bin/python} HERE=$(cd "$(dirname "$0")" && pwd) FIRST=${FIRST:-1029} LAST=1060 COPY=/tmp/v4-table
export OMP_NUM_THREADS=1
done4() { for m in none multitask maml prime; do [ -f runs/v4/cells/seed$1/$m/results.json ] || return 1; done; }
rm -rf $COPY
s=$FIRST
while [ $s -le $LAST ] && done4 $s; do
    for m in none multitask maml prime; do mkdir -p $COPY/seed$s/$m && cp runs/v4/cells/seed$s/$m/results.json $_; done
    s=$((s + 1))
done
[ $s -ge $((FIRST + 2)) ] || { echo "v4-table: fewer than 2 finished worlds from $FIRST" >&2; exit 1; }
$PY train.py --stage experiment --per-world --testbed runs/v4/testbed --prime-steps 60 --out $COPY --seed $FIRST \
    --seeds $((s - FIRST)) --methods none,multitask,maml,prime > $COPY.log 2>&1
rm -f $HERE/results/v4-worlds-$FIRST-*.json $HERE/results/v4-worlds-$FIRST-*.md  # this machine's earlier table
cp $COPY/experiment.json $HERE/results/v4-worlds-$FIRST-$((s - 1)).json
cp $COPY/experiment.md $HERE/results/v4-worlds-$FIRST-$((s - 1)).md
pooled=v4$([ $s -gt $LAST ] || echo -partial)
$PY $HERE/pool.py $HERE/results/$pooled.json $HERE/results/v4-worlds-*.json | tee $HERE/results/$pooled.md
