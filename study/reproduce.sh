#!/usr/bin/env bash
# Reproduces a finished study as it ran: every cell with the code of the study's pinned commit (study/STUDY/COMMIT),
# checked out here as a git worktree, then the table (by that commit's code too) and the pre-registered verdict.
#   study/reproduce.sh v4 [FIRST LAST]   worlds 1001-1060, none / multitask / maml / prime (about 9 hours on 2 cores)
#   study/reproduce.sh v5 [FIRST LAST]   worlds 2001-2160, none / multitask / prime (about 27 hours on 2 cores)
#   study/reproduce.sh v6 [FIRST LAST]   worlds 3001-3340, v6's six cells (about 58 hours on 2 cores)
#   study/reproduce.sh v5 2001 2010 --dry-run
# FIRST LAST: a range of the study's worlds (the verdict is then marked partial). --dry-run checks that the commit
# and every script the run calls exist, prints the commands and runs nothing. PY= the Python (default: this
# repository's .venv/bin/python, else python3); WORKTREE= where the commit is checked out (default runs/pinned-SHORT).
# The cells are in WORKTREE/runs/STUDY/cells; after a stop the same command goes on from the finished cells.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
fail() { echo "error: study/reproduce.sh: $*" >&2; exit 2; }

dry=0 args=()
for a in "$@"; do if [ "$a" = --dry-run ]; then dry=1; else args+=("$a"); fi; done
set -- "${args[@]+"${args[@]}"}"
study=${1:-}
case "$study" in  # each study's worlds and methods, as its protocol in study/LOG.md names them
    v4) first=1001 last=1060 methods=none,multitask,maml,prime files="train.py study/final.sh study/v4.sh" ;;
    v5) first=2001 last=2160 methods=none,multitask,prime files="train.py study/final.sh" ;;
    v6) first=3001 last=3340 methods="none, prime[lora] and prime[houlsby], each -> lora and -> houlsby"
        files="study/experiment.py study/v6/run.sh study/v6/table.py" ;;
    *) fail "expected a study, v4, v5 or v6, then optionally FIRST LAST and --dry-run (got '${*}')" ;;
esac
worlds=$((last - first + 1))
if [ $# -eq 3 ]; then
    [[ $2 =~ ^[0-9]+$ && $3 =~ ^[0-9]+$ && $2 -ge $first && $3 -le $last && $2 -le $3 ]] \
        || fail "$study: FIRST LAST must be worlds within $first-$last, FIRST <= LAST (got $2 $3)"
    first=$2 last=$3
elif [ $# -ne 1 ]; then
    fail "$study: give both FIRST and LAST, or neither"
fi

# The pinned commit and what the run calls of it; the copies kept in study/STUDY/ must be the pinned ones.
commit=$(cat "study/$study/COMMIT")
git rev-parse -q --verify "$commit^{commit}" > /dev/null \
    || fail "commit $commit (study/$study/COMMIT) is not in this clone (a shallow clone? git fetch --unshallow)"
for f in $files; do
    git cat-file -e "$commit:$f" 2> /dev/null || fail "$f does not exist at $commit"
done
[ "$study" = v6 ] || git grep -q -F '"experiment"' "$commit" -- train.py || fail "train.py at $commit has no --stage experiment"
[ "$study" != v4 ] || [ "$(git rev-parse "$commit:study/v4.sh")" = "$(git hash-object study/v4/v4.sh)" ] \
    || fail "study/v4/v4.sh differs from study/v4.sh at $commit (it must be kept as it ran)"
for f in $([ "$study" = v6 ] || echo "study/$study/$study.sh") study/analysis/verdict.py; do
    [ -f "$f" ] || fail "$f is missing"
done

if [ -z "${PY:-}" ]; then PY=$([ -x .venv/bin/python ] && echo "$REPO/.venv/bin/python" || command -v python3); fi
[[ $PY == /* ]] || PY=$(command -v "$PY" || echo "$REPO/$PY")  # absolute: the scripts run in the worktree
wt=${WORKTREE:-runs/pinned-${commit:0:7}}
n=$((last - first + 1))
if [ "$study" = v4 ]; then  # v4.sh of the commit runs the cells and, last, their table (its final.sh table)
    cells="cd $wt && FIRST=$first N=$n PY=$PY bash study/v4.sh"
    table="cat $wt/runs/v4/cells/experiment.md"
else  # v5.sh (not in the commit) ran in its worktree; the table as v5/table.sh made it, without the copy
    cells="cd $wt && FIRST=$first N=$n PY=$PY bash $REPO/study/v5/v5.sh"
    table="cd $wt && $PY train.py --stage experiment --per-world --testbed runs/v5/testbed --prime-steps 60 \
--out runs/v5/cells --seed $first --seeds $n --methods $methods"
fi
verdict="$PY -m study.analysis.verdict $wt/runs/$study/cells/experiment.json $worlds"
if [ "$study" = v6 ]; then  # run.sh of the commit runs the cells; its table prints the pre-registered verdict
    cells="cd $wt && FIRST=$first N=$n PY=$PY NAME=study bash study/v6/run.sh"
    table="cd $wt && $PY -m study.v6.table runs/v6/study --worlds $worlds" verdict=""
fi
steps=("git worktree add --detach $wt $commit" "($cells)" "($table)" ${verdict:+"$verdict"})
echo "study $study: worlds $first-$last ($n of $worlds), methods $methods, code of commit $commit"
if [ -d "$wt" ]; then  # made by an earlier call: it must be the pinned commit
    [ "$(git -C "$wt" rev-parse HEAD)" = "$commit" ] || fail "$wt is not a worktree of $commit (WORKTREE=...)"
    steps=("${steps[@]:1}")
fi
for step in "${steps[@]}"; do
    echo "+ $step"
    [ $dry = 1 ] || eval "$step"
done
