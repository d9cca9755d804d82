"""One table from the experiment.json files of disjoint worlds (study v4: each machine's worlds have their own, 3.7):
the per-world scores put together, and each method's mean and the paired differences computed again from them as
study/experiment.py computes them (its paired()), in the same order of worlds. Writes the pooled experiment.json to OUT
(for verdict.py and compare.py) and prints the paired target-average rows.
usage: python study/pool.py OUT.json A.json B.json ...   (table.sh runs it)"""
import json
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not study/ (its select.py shadows the stdlib)
from study.experiment import METHODS, paired  # noqa: E402

out, parts = sys.argv[1], [json.load(open(f)) for f in sys.argv[2:]]
seeds = sorted(s for part in parts for s in part["seeds"])
methods = sorted(parts[0]["scores"], key=METHODS.index)
if len(set(seeds)) < len(seeds) or any(sorted(part["scores"], key=METHODS.index) != methods for part in parts):
    sys.exit(f"{', '.join(sys.argv[2:])}: expected disjoint worlds of the same methods")
scores = {m: {str(s): part["scores"][m][str(s)] for s in seeds for part in parts if s in part["seeds"]}
          for m in methods}
cols = list(scores[methods[0]][str(seeds[0])])
column = lambda m, c: [scores[m][str(s)][c] for s in seeds]
summary = {m: {c: {"mean": statistics.mean(column(m, c)), "std": statistics.stdev(column(m, c))} for c in cols}
           for m in methods}
vs = {f"{a} - {b}": {c: paired([x - y for x, y in zip(column(a, c), column(b, c))]) for c in cols}
      for i, a in enumerate(methods) for b in methods[:i]}
Path(out).write_text(json.dumps({"seeds": seeds, "per_world": True, "scores": scores, "summary": summary,
                                 "paired": vs, "pooled_from": sys.argv[2:]}, indent=2) + "\n")
print(f"{len(seeds)} worlds, {seeds[0]}-{seeds[-1]}\n| paired, target avg | Δ | 95% CI | wins |\n|---|---|---|---|")
for k, d in vs.items():
    d = d["avg"]
    print(f"| {k} | {d['mean']:+.1f} | [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] | {d['wins']}/{d['n']} |")
