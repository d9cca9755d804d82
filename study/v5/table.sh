#!/usr/bin/env bash
# A study's table across changes of machine (v4 and v5, study/README.md 3.7-3.8; a new machine starts without runs/).
# Each machine's worlds get their own table, results/STUDY-worlds-A-B.json, made here for the worlds from FIRST up to
# the last one whose cells (METHODS) have all finished, with final.sh table's command on a copy of their
# results.json (the running study's folder is left alone); pool.py puts every such table together: results/STUDY.json
# once all worlds up to LAST are in, else results/STUDY-partial.json (descriptive only). Then: verdict.py THAT.json.
#   cd WORKTREE_OF_528169d && FIRST=1029 PY=/path/to/python bash /path/to/main/study/table.sh            (v4)
#   cd WORKTREE_OF_528169d && STUDY=v5 FIRST=2001 PY=/path/to/python bash /path/to/main/study/table.sh   (v5)
set -euo pipefail
PY=${PY:-.venv/bin/python} HERE=$(cd "$(dirname "$0")" && pwd) STUDY=${STUDY:-v4} COPY=/tmp/study-table
if [ $STUDY = v4 ]; then FIRST=${FIRST:-1029} LAST=1060 METHODS="none multitask maml prime"
else FIRST=${FIRST:-2001} LAST=2160 METHODS="none multitask prime"; fi
export OMP_NUM_THREADS=1
done_all() { for m in $METHODS; do [ -f runs/$STUDY/cells/seed$1/$m/results.json ] || return 1; done; }
rm -rf $COPY
s=$FIRST
while [ $s -le $LAST ] && done_all $s; do
    for m in $METHODS; do mkdir -p $COPY/seed$s/$m && cp runs/$STUDY/cells/seed$s/$m/results.json $_; done
    s=$((s + 1))
done
[ $s -ge $((FIRST + 2)) ] || { echo "table: fewer than 2 finished worlds from $FIRST" >&2; exit 1; }
$PY train.py --stage experiment --per-world --testbed runs/$STUDY/testbed --prime-steps 60 --out $COPY --seed $FIRST \
    --seeds $((s - FIRST)) --methods $(echo $METHODS | tr ' ' ,) > $COPY.log 2>&1
rm -f $HERE/results/$STUDY-worlds-$FIRST-*.json $HERE/results/$STUDY-worlds-$FIRST-*.md  # this machine's earlier table
cp $COPY/experiment.json $HERE/results/$STUDY-worlds-$FIRST-$((s - 1)).json
cp $COPY/experiment.md $HERE/results/$STUDY-worlds-$FIRST-$((s - 1)).md
pooled=$STUDY$([ $s -gt $LAST ] || echo -partial)
$PY $HERE/pool.py $HERE/results/$pooled.json $HERE/results/$STUDY-worlds-*.json | tee $HERE/results/$pooled.md
