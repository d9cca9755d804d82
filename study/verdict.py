"""Study v4's pre-registered decision rule (study/README.md, 3.7) applied to an experiment.json: for each primary
comparison, interval excludes 0 -> "differs" (with its sign; said too if it also lies inside [-1, +1]); else inside
[-1, +1] -> "equivalent within 1 F1"; else "undecided". On fewer than the 60 worlds it prints the same, marked as
partial (the verdict is read once, from all 60).
usage: python study/verdict.py runs/v4/cells/experiment.json"""
import json
import sys

report = json.load(open(sys.argv[1]))
n = len(report["seeds"])
for key in ("prime - multitask", "prime - maml"):
    d = report["paired"][key]["avg"]
    lo, hi = d["ci95"]
    inside = -1 <= lo and hi <= 1
    if lo > 0 or hi < 0:
        verdict = f"differs ({'prime higher' if lo > 0 else 'prime lower'})" + ", inside [-1, +1]" * inside
    else:
        verdict = "equivalent within 1 F1" if inside else "undecided"
    print(f"{key}: {d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}], wins {d['wins']}/{d['n']}: {verdict}"
          + ("" if n == 60 else f"  (PARTIAL: {n} of 60 worlds, descriptive, not the verdict)"))
