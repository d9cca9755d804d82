"""The testbed's calibration table: `none`'s test F1 per world, with an untrained encoder's where one was run, and
the issue's four bounds (en >= 75; target average in [35, 65]; every target >= 20; pretrained >= random + 10).
usage: python -m study.analysis.calibration CELLS [--random ROOT] SEED ...
  CELLS: the folder with seed<s>/none/results.json (an experiment's --out); ROOT: study/stages/random.sh's OUT"""
import argparse
import json
import statistics
from pathlib import Path


def results(file):
    """A cell's results.json, or None where that cell was not run."""
    return json.loads(file.read_text()) if file.exists() else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells")
    ap.add_argument("--random", help="study/stages/random.sh's OUT: <this>-<seed>/seed<seed>/none/results.json")
    ap.add_argument("seeds", type=int, nargs="+")
    args = ap.parse_args(argv)
    rows, avgs, held = [], [], []
    for s in args.seeds:
        r = results(Path(args.cells) / f"seed{s}" / "none" / "results.json")
        rnd = results(Path(f"{args.random}-{s}") / f"seed{s}" / "none" / "results.json") if args.random else None
        langs = [l for l in r["f1"] if l != r["source"]]
        for who, res in (("pretrained", r), ("random", rnd)):
            if res is None:
                continue
            avg, low = 100 * res["target_avg_f1"], 100 * min(res["f1"][l] for l in langs)
            gap = f" (pretrained +{100 * r['target_avg_f1'] - avg:.1f})" if who == "random" else ""
            rows.append(f"| {s} | {who} | " + " | ".join(f"{100 * res['f1'][l]:.1f}" for l in [r["source"]] + langs)
                        + f" | {avg:.1f}{gap} | {low:.1f} |")
        avgs.append(100 * r["target_avg_f1"])
        held.append(100 * r["f1"][r["source"]] >= 75 and 35 <= avgs[-1] <= 65 and min(r["f1"][l] for l in langs) >= .2
                    and (rnd is None or r["target_avg_f1"] - rnd["target_avg_f1"] >= .1))
    print(f"| world | encoder | {' | '.join([r['source']] + langs)} | target avg | lowest target |")
    print("|---" * (len(langs) + 5) + "|")
    print("\n".join(rows))
    sd = f" sd {statistics.stdev(avgs):.1f}" if len(avgs) > 1 else ""
    print(f"\nmean target avg {statistics.mean(avgs):.1f}{sd} n {len(avgs)}; all four bounds hold on "
          f"{sum(held)}/{len(held)}"
          " worlds (the random-encoder bound where one was run)")


if __name__ == "__main__":
    main()
