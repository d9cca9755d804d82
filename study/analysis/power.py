"""Study v5's power analysis (study/LOG.md, v5): from a finished table's per-world differences of one comparison,
the chance that W fresh one-run worlds give a decided verdict under v4's decision rule (verdict.py), by simulation.
The spread of a world's difference is drawn from its sampling distribution (scaled chi-square), not taken as known;
the true difference is each of a few values around the table's mean.
With --sd S --sd-worlds N the spread is S as estimated from N worlds of another table (v6's check at v5's sd 3.49
of 160 worlds), the true differences still the table's.
usage: python -m study.analysis.power study/results/v4.json "prime - multitask" 100 120 140 160 180 200"""
import argparse
import json

import numpy as np

from study.experiment import t_quantile


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="a finished experiment.json")
    ap.add_argument("comparison", help='e.g. "prime - multitask"')
    ap.add_argument("designs", type=int, nargs="+", help="numbers of worlds W to simulate")
    ap.add_argument("--sd", type=float, help="simulate this per-world spread instead of the table's")
    ap.add_argument("--sd-worlds", type=int, default=160, help="the worlds --sd was estimated from (default: 160)")
    args = ap.parse_args(argv)
    report, key, designs = json.load(open(args.table)), args.comparison, args.designs
    a, b = key.split(" - ")
    seeds = [str(s) for s in report["seeds"]]
    diffs = np.array([report["scores"][a][s]["avg"] - report["scores"][b][s]["avg"] for s in seeds])
    n, sd = len(diffs), diffs.std(ddof=1)
    print(f"{key}: {n} worlds, mean {diffs.mean():+.2f}, sd {sd:.2f}")
    if args.sd:
        n, sd = args.sd_worlds, args.sd
        print(f"simulated at sd {sd:.2f} (estimated from {n} worlds)")
    print("| worlds W | true Δ | P(decided) | median half-width |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for w in designs:
        for true in (0.0, round(diffs.mean(), 2), 0.8):
            sims = 20000
            sigma = sd * np.sqrt((n - 1) / rng.chisquare(n - 1, sims))  # the spread, uncertain as n worlds leave it
            x = rng.standard_normal((sims, w)) * sigma[:, None] + true
            mean, half = x.mean(1), t_quantile(0.975, w - 1) * x.std(1, ddof=1) / np.sqrt(w)
            lo, hi = mean - half, mean + half
            decided = (lo > 0) | (hi < 0) | ((lo >= -1) & (hi <= 1))
            print(f"| {w} | {true:+.2f} | {decided.mean():.3f} | ±{np.median(half):.2f} |")


if __name__ == "__main__":
    main()
