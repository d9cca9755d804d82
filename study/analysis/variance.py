"""Where a cell's noise comes from, and the study design it calls for (study v4's pilot and power analysis).

usage: python -m study.analysis.variance PILOT_DIR [SINGLE_RUN.json ...]

PILOT_DIR is an experiment folder whose cells ran --prime-seeds 2 --finetune-seeds 2 (the pilot: study/v4/v4.sh's
header). Per method, a run's target-average F1 (x100) is taken as  world + priming run + fine-tuning run:
  fine-tuning variance  s2_F: the pooled within-priming-run variance of the fine-tuning runs;
  priming variance      s2_P: the variance of a priming run's mean over its fine-tunings, within a world, less s2_F / N.
The world-by-method part of a paired difference (what no run count removes) is what the per-world differences of
one-run tables (SINGLE_RUN.json: experiment.json of earlier studies, e.g. study/results/v3.json) vary by beyond those
two; it is estimated from them (their worlds are many more than the pilot's). The expected 95% interval of a
difference A - B over W worlds with M priming x N fine-tuning runs per cell is then
  t(0.975, W - 1) * sqrt((s2_int + sum over A, B of (s2_P / M + s2_F / (M N))) / W),
and a design's cost is counted from the pilot's own timings (file times of each run's outputs).
"""
import argparse
import itertools
import json
import statistics
from pathlib import Path

from study.experiment import t_quantile

PRIMARY = [("prime", "multitask"), ("prime", "maml")]


def components(runs, method):
    """(s2_P, s2_F, fine-tuning runs per priming run) of a method's runs in the pilot."""
    per_world = [runs[method][w] for w in sorted(runs["none"])]
    by_prime = [[[r["target_avg_f1"] * 100 for r in rs if r["prime_seed"] == p]
                 for p in dict.fromkeys(r["prime_seed"] for r in rs)] for rs in per_world]
    n = len(by_prime[0][0])
    s2_f = statistics.mean(statistics.variance(ft) for w in by_prime for ft in w)
    if method == "none":  # one encoder: no priming variance
        return 0.0, s2_f, n
    s2_p = statistics.mean(statistics.variance([statistics.mean(ft) for ft in w]) for w in by_prime) - s2_f / n
    return max(0.0, s2_p), s2_f, n


def minutes(pilot, worlds, method):
    """Wall minutes of one priming run and of one fine-tuning + evaluation, from the pilot's file times."""
    prime, tune = [], []
    for w in worlds:
        cell = pilot / f"seed{w}" / method
        t = (cell / "config.json").stat().st_mtime
        for p in sorted(cell.glob("prime*")) or [cell]:
            if method != "none":
                prime.append((p / "prime" / "model" / "model.safetensors").stat().st_mtime - t)
                t += prime[-1]
            for f in sorted(p.glob("finetune[0-9]*")):
                tune.append((f / "results.json").stat().st_mtime - t)
                t += tune[-1]
    return (statistics.mean(prime) / 60 if prime else 0.0), statistics.mean(tune) / 60


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pilot", type=Path, help="the pilot's experiment folder")
    ap.add_argument("tables", nargs="*", help="one-run experiment.json files of earlier studies")
    args = ap.parse_args(argv)
    runs = json.loads((args.pilot / "experiment.json").read_text())["runs"]
    methods = list(runs)
    comp = {m: components(runs, m) for m in methods}
    cost = {m: minutes(args.pilot, sorted(runs["none"]), m) for m in methods}
    print("| method | s_P (priming run) | s_F (fine-tuning run) | minutes: priming | fine-tuning + eval |\n"
          "|---|---|---|---|---|")
    for m in methods:
        print(f"| {m} | {comp[m][0] ** 0.5:.2f} | {comp[m][1] ** 0.5:.2f} | {cost[m][0]:.1f} | {cost[m][1]:.1f} |")

    # the world-by-method variance of each primary difference, from one-run tables (M = N = 1)
    interaction = {}
    for a, b in PRIMARY:
        diffs = [table["scores"][a][w]["avg"] - table["scores"][b][w]["avg"]
                 for f in args.tables for table in [json.loads(Path(f).read_text())] for w in table["scores"][a]]
        noise = sum(comp[m][0] + comp[m][1] for m in (a, b))
        interaction[a, b] = max(0.0, statistics.variance(diffs) - noise) if len(diffs) > 1 else 0.0
        print(f"\n{a} - {b}: sd of one-run per-world differences {statistics.stdev(diffs):.2f} over {len(diffs)} "
              f"worlds, of which run noise sd {noise ** 0.5:.2f}, world-by-method sd {interaction[a, b] ** 0.5:.2f}")

    def half_width(a, b, W, M, N):
        var = interaction[a, b] + sum(comp[m][0] / M + comp[m][1] / (M * N) for m in (a, b))
        return t_quantile(0.975, W - 1) * (var / W) ** 0.5

    def world_minutes(M, N, build=4.0):
        """Single-process minutes of one world: its build, none's N fine-tunings, each method's M x N runs."""
        return build + sum((M * cost[m][0] if m != "none" else 0) + (1 if m == "none" else M) * N * cost[m][1]
                           for m in methods)

    print("\n| W | M | N | half-width prime - multitask | prime - maml | process-hours |\n|---|---|---|---|---|---|")
    for W, M, N in itertools.product((10, 20, 30, 40, 50, 60), (1, 2), (1, 2, 3)):
        hw = [half_width(a, b, W, M, N) for a, b in PRIMARY]
        print(f"| {W} | {M} | {N} | ±{hw[0]:.2f} | ±{hw[1]:.2f} | {W * world_minutes(M, N) / 60:.1f} |")


if __name__ == "__main__":
    main()
