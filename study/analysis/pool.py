"""One table from the experiment.json files of disjoint worlds (studies v4 and v5: each machine's worlds have their
own): the per-world scores put together, and each method's mean and the paired differences computed again from them
as study/experiment.py computes them (its paired()), in the same order of worlds. Writes the pooled experiment.json
to OUT (for verdict and compare) and prints the paired target-average rows.
usage: python -m study.analysis.pool OUT.json A.json B.json ...   (v5/table.sh ran it)"""
import argparse
import json
import statistics
from pathlib import Path

from study.experiment import METHODS, paired


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the pooled experiment.json to write")
    ap.add_argument("tables", nargs="+", help="experiment.json files of disjoint worlds")
    args = ap.parse_args(argv)
    parts = [json.load(open(f)) for f in args.tables]
    seeds = sorted(s for part in parts for s in part["seeds"])
    methods = sorted(parts[0]["scores"], key=METHODS.index)
    if len(set(seeds)) < len(seeds) or any(sorted(part["scores"], key=METHODS.index) != methods for part in parts):
        ap.exit(2, f"error: {', '.join(args.tables)}: expected disjoint worlds of the same methods\n")
    scores = {m: {str(s): part["scores"][m][str(s)] for s in seeds for part in parts if s in part["seeds"]}
              for m in methods}
    cols = list(scores[methods[0]][str(seeds[0])])

    def column(m, c):
        return [scores[m][str(s)][c] for s in seeds]

    summary = {m: {c: {"mean": statistics.mean(column(m, c)), "std": statistics.stdev(column(m, c))} for c in cols}
               for m in methods}
    vs = {f"{a} - {b}": {c: paired([x - y for x, y in zip(column(a, c), column(b, c))]) for c in cols}
          for i, a in enumerate(methods) for b in methods[:i]}
    Path(args.out).write_text(json.dumps({"seeds": seeds, "per_world": True, "scores": scores, "summary": summary,
                                          "paired": vs, "pooled_from": args.tables}, indent=2) + "\n")
    print(f"{len(seeds)} worlds, {seeds[0]}-{seeds[-1]}\n| paired, target avg | Δ | 95% CI | wins |\n|---|---|---|---|")
    for k, d in vs.items():
        d = d["avg"]
        print(f"| {k} | {d['mean']:+.1f} | [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] | {d['wins']}/{d['n']} |")


if __name__ == "__main__":
    main()
