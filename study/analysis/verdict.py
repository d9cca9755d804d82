"""The pre-registered decision rule of studies v4 and v5 (study/README.md, protocols) applied to an experiment.json:
for each primary comparison in it (v4: `prime - multitask`, `prime - maml`; v5 has no `maml`), interval excludes 0
-> "differs" (with its sign; said too if it also lies inside [-1, +1]); else inside [-1, +1] -> "equivalent within
1 F1"; else "undecided". On fewer than the study's W worlds it prints the same, marked as partial (the verdict is
read once, from all W).
usage: python -m study.analysis.verdict runs/v4/cells/experiment.json [W]   (W: 60 for v4, the default; 160 for v5)"""
import argparse
import json


def verdict(report, w, keys=("prime - multitask", "prime - maml")):
    """One line per primary comparison `A - B` in the report (keys: v4's and v5's by default): the interval, the
    wins and the rule's verdict."""
    n, lines = len(report["seeds"]), []
    for key in keys:
        if key not in report["paired"]:
            continue
        d = report["paired"][key]["avg"]
        if d["ci95"] is None:  # one world: no interval, no verdict
            lines.append(f"{key}: {d['mean']:+.2f} on one world: no interval (PARTIAL: 1 of {w} worlds)")
            continue
        lo, hi = d["ci95"]
        inside = -1 <= lo and hi <= 1
        if lo > 0 or hi < 0:
            said = f"differs ({key.split(' - ')[0]} {'higher' if lo > 0 else 'lower'})" + ", inside [-1, +1]" * inside
        else:
            said = "equivalent within 1 F1" if inside else "undecided"
        lines.append(f"{key}: {d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}], wins {d['wins']}/{d['n']}: {said}"
                     + ("" if n == w else f"  (PARTIAL: {n} of {w} worlds, descriptive, not the verdict)"))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="an experiment.json (or pool.py's pooled one)")
    ap.add_argument("worlds", type=int, nargs="?", default=60, help="the study's W (v4: 60, v5: 160)")
    args = ap.parse_args(argv)
    with open(args.table) as f:
        print("\n".join(verdict(json.load(f), args.worlds)))


if __name__ == "__main__":
    main()
