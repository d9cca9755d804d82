"""The pre-registered decision rule of studies v4 and v5 (study/README.md, 3.7-3.8) applied to an experiment.json:
for each primary comparison in it (v4: `prime - multitask`, `prime - maml`; v5 has no `maml`), interval excludes 0
-> "differs" (with its sign; said too if it also lies inside [-1, +1]); else inside [-1, +1] -> "equivalent within
1 F1"; else "undecided". On fewer than the study's W worlds it prints the same, marked as partial (the verdict is
read once, from all W).
usage: python study/verdict.py runs/v4/cells/experiment.json [W]   (W: 60 for v4, the default; 160 for v5)"""
import json
import sys

report = json.load(open(sys.argv[1]))
n, w = len(report["seeds"]), int(sys.argv[2]) if len(sys.argv) > 2 else 60
for key in ("prime - multitask", "prime - maml"):
    if key not in report["paired"]:
        continue
    d = report["paired"][key]["avg"]
    lo, hi = d["ci95"]
    inside = -1 <= lo and hi <= 1
    if lo > 0 or hi < 0:
        verdict = f"differs ({'prime higher' if lo > 0 else 'prime lower'})" + ", inside [-1, +1]" * inside
    else:
        verdict = "equivalent within 1 F1" if inside else "undecided"
    print(f"{key}: {d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}], wins {d['wins']}/{d['n']}: {verdict}"
          + ("" if n == w else f"  (PARTIAL: {n} of {w} worlds, descriptive, not the verdict)"))
