"""Two runs of the same cells (experiment.json of the same worlds and methods, e.g. on two machines) side by side:
each method's target average in both, the per-world correlation and mean absolute change of its cells, and the
paired comparisons (95% t-intervals) in both.
usage: python study/compare.py A.json B.json"""
import json
import statistics
import sys

a, b = (json.load(open(f)) for f in sys.argv[1:3])
seeds = [str(s) for s in a["seeds"]]
if [str(s) for s in b["seeds"]] != seeds:
    sys.exit(f"{sys.argv[1]} and {sys.argv[2]} cover different worlds")
ci = lambda d: f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] {d['wins']}/{d['n']}"
print("| method | target avg, A | target avg, B | per-world r | mean abs change |\n|---|---|---|---|---|")
for m in a["scores"]:
    x, y = ([run["scores"][m][s]["avg"] for s in seeds] for run in (a, b))
    print(f"| {m} | {statistics.mean(x):.1f} ± {statistics.stdev(x):.1f} | {statistics.mean(y):.1f} ± "
          f"{statistics.stdev(y):.1f} | {statistics.correlation(x, y):.2f} | "
          f"{statistics.mean(abs(p - q) for p, q in zip(x, y)):.1f} |")
print("\n| paired, target avg | A | B |\n|---|---|---|")
for k in a["paired"]:
    print(f"| {k} | {ci(a['paired'][k]['avg'])} | {ci(b['paired'][k]['avg'])} |")
