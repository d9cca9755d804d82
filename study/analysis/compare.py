"""Two runs of the same cells (experiment.json of the same worlds and methods, e.g. on two machines) side by side:
each method's target average in both, the per-world correlation and mean absolute change of its cells, and the
paired comparisons (95% t-intervals) in both.
usage: python -m study.analysis.compare A.json B.json"""
import argparse
import json
import statistics


def interval(d):
    """A paired difference as `mean [lo, hi] wins/n`."""
    return f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] {d['wins']}/{d['n']}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs=2, metavar="TABLE.json", help="two experiment.json of the same cells")
    files = ap.parse_args(argv).tables
    a, b = (json.load(open(f)) for f in files)
    seeds = [str(s) for s in a["seeds"]]
    if [str(s) for s in b["seeds"]] != seeds:
        ap.exit(2, f"error: {files[0]} and {files[1]} cover different worlds\n")
    print("| method | target avg, A | target avg, B | per-world r | mean abs change |\n|---|---|---|---|---|")
    for m in a["scores"]:
        x, y = ([run["scores"][m][s]["avg"] for s in seeds] for run in (a, b))
        print(f"| {m} | {statistics.mean(x):.1f} ± {statistics.stdev(x):.1f} | {statistics.mean(y):.1f} ± "
              f"{statistics.stdev(y):.1f} | {statistics.correlation(x, y):.2f} | "
              f"{statistics.mean(abs(p - q) for p, q in zip(x, y)):.1f} |")
    print("\n| paired, target avg | A | B |\n|---|---|---|")
    for k in a["paired"]:
        print(f"| {k} | {interval(a['paired'][k]['avg'])} | {interval(b['paired'][k]['avg'])} |")


if __name__ == "__main__":
    main()
