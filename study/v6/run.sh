#!/usr/bin/env bash
# Study v6's six cells per world (study/v6/PROTOCOL.md): none -> lora, none -> houlsby, prime[lora] -> lora,
# prime[houlsby] -> lora, prime[houlsby] -> houlsby, prime[lora] -> houlsby, on worlds FIRST..FIRST+N-1, with the v5
# recipe and the calibration's Houlsby settings (H_SIZE, H_LR below). Run it from a worktree of a fixed commit:
#   cd WORKTREE && NAME=pilot FIRST=501 N=6 PY=/path/to/python nohup setsid nice -n 10 bash study/v6/run.sh \
#       > runs/v6-pilot.log 2>&1 &
# Resumes: the same command again (finished cells are kept, a killed cell runs again from its start; a world's
# pretraining resumes from its checkpoint). P=2 cells at a time, one thread each. Each cell is an experiment folder of
# its own (two processes never write one folder's files): runs/v6/NAME/WORLD/none-DOWN or prime-PRIMED-DOWN, its log
# beside it. The table: python -m study.v6.table runs/v6/NAME.
# A world is built by its `none -> lora` cell, one world ahead of the cells that wait for it. The matched cells
# prime[X] -> X prime; the crossed ones prime[X] -> Y fine-tune the encoder their matched cell primed (--primed),
# once it is saved: on one machine the same bytes as their own priming (same flags and seed; PROTOCOL.md, section 3,
# has the pilot check it). A failed cell leaves CELL.failed beside its log (the crossed cell of a failed matched
# one too); the script then ends with their list and exit code 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
NAME=${NAME:?NAME=pilot or study} FIRST=${FIRST:?} N=${N:?}
# Houlsby's size and rate: the calibration's selection (PROTOCOL.md, section 2), e.g. houlsby-a32-lr3e-3
selected=$($PY -c "import json; print(json.load(open('study/results/v6-calibration.json'))['selected'] or '')")
[[ $selected =~ ^houlsby-a([0-9]+)-lr(.+)$ ]] || { echo "study/results/v6-calibration.json: no selection yet"; exit 2; }
H_SIZE=${BASH_REMATCH[1]} H_LR=${BASH_REMATCH[2]}
echo "Houlsby: --adapter-size $H_SIZE, learning rate $H_LR (the calibration's selection)"
export PY OUT=runs/v6/$NAME TESTBED=runs/v6/testbed
export COMMON="--per-world --testbed $TESTBED --threads 1 --jobs 1 --adapter-size $H_SIZE"
export PRIME="--prime-lr 1e-3 --inner-opt adam --inner-steps 20 --support-batches 20 --first-order"  # v5's prime
export PRIMED_lora="--prime-peft lora --inner-lr 5e-3" PRIMED_houlsby="--prime-peft houlsby --inner-lr $H_LR"
export DOWN_lora="--peft lora --finetune-lr 5e-3" DOWN_houlsby="--peft houlsby --finetune-lr $H_LR"
mkdir -p $OUT
worlds=($(seq $FIRST $((FIRST + N - 1))))
{
    echo "${worlds[0]} none - lora"
    for i in "${!worlds[@]}"; do
        [ $((i + 1)) -lt ${#worlds[@]} ] && echo "${worlds[i + 1]} none - lora"
        for cell in "prime lora lora" "prime houlsby houlsby" "none - houlsby" "prime lora houlsby" \
                    "prime houlsby lora"; do echo "${worlds[i]} $cell"; done
    done
} | xargs -P "${P:-2}" -L 1 bash -c '
    w=$0 method=$1 primed=$2 down=$3
    cell=$OUT/$w/$method-$down; [ $method = none ] || cell=$OUT/$w/$method-$primed-$down
    mkdir -p $OUT/$w && rm -f $cell.failed
    [ "$method $down" = "none lora" ] || until [ -f $TESTBED-$w/pretrain/model/tokenizer.json ]; do sleep 20; done
    flags=$(eval echo \$DOWN_$down); [ $method = none ] || flags="$PRIME $(eval echo \$PRIMED_$primed) $flags"
    matched=$OUT/$w/prime-$primed-$primed
    if [ $method = prime ] && [ $primed != $down ]; then  # wait for the matched cell'"'"'s primed encoder
        until [ -f $matched/seed$w/prime/prime/model/primed.json ]; do
            [ -f $matched.failed ] && { echo "$matched failed: no encoder to fine-tune" > $cell.log; touch $cell.failed
                                        exit 0; }
            sleep 20
        done
        flags="$flags --primed $matched/seed$w/prime/prime/model"
    fi
    $PY study/experiment.py $COMMON --seed $w --seeds 1 --methods $method $flags --out $cell \
        > $cell.log 2>&1 || touch $cell.failed'
failed=$(ls $OUT/*/*.failed 2> /dev/null || true)
[ -z "$failed" ] || { echo "failed cells (their logs beside them):" $failed; exit 1; }
echo "done: python -m study.v6.table $OUT"
