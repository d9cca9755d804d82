"""Study v6's table (study/v6/PROTOCOL.md) from the cells of study/v6/run.sh: the six cells per world, each world's
scores as study/experiment.py computes them, and the paired differences over the worlds whose six cells have all
finished: the primary comparisons (matched minus mismatched priming, per downstream method), then the secondary ones.

    python -m study.v6.table runs/v6/pilot [--save study/results/v6-pilot] [--worlds W]

Writes PREFIX.json in experiment.json's layout (scores per cell name and world, summary, paired; for
study.analysis.power) and PREFIX.md. With --worlds W (the pre-registered number), a table of fewer complete worlds
is marked partial and descriptive.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from model import atomic_write
from study.analysis.verdict import verdict
from study.experiment import paired

# cell name -> its folder under OUT/WORLD: the experiment folder run.sh gives it, then the cell's within it
# (study/experiment.py names it after the method, and the priming's PEFT method where fine-tuning uses another)
CELLS = {"none -> lora": "none-lora/none", "none -> houlsby": "none-houlsby/none",
         "prime[lora] -> lora": "prime-lora-lora/prime", "prime[houlsby] -> lora": "prime-houlsby-lora/prime-houlsby",
         "prime[houlsby] -> houlsby": "prime-houlsby-houlsby/prime",
         "prime[lora] -> houlsby": "prime-lora-houlsby/prime-lora"}
PRIMARY = [("prime[lora] -> lora", "prime[houlsby] -> lora"), ("prime[houlsby] -> houlsby", "prime[lora] -> houlsby")]
SECONDARY = [("prime[lora] -> lora", "none -> lora"), ("prime[houlsby] -> houlsby", "none -> houlsby"),
             ("prime[houlsby] -> lora", "none -> lora"), ("prime[lora] -> houlsby", "none -> houlsby"),
             ("none -> houlsby", "none -> lora")]
COLS = ["en", "de", "ja", "ru", "tr", "avg"]


def scores(folder):
    """A finished cell's F1 x 100 per language and the target average, or None."""
    path = folder / "results.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return {l: 100 * r["f1"][l] for l in COLS[:-1]} | {"avg": 100 * r["target_avg_f1"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="run.sh's folder (runs/v6/NAME)")
    p.add_argument("--save", help="write PREFIX.md and PREFIX.json")
    p.add_argument("--worlds", type=int, help="the pre-registered number of worlds (fewer: partial)")
    args = p.parse_args(argv)
    found = sorted(int(d.name) for d in args.out.iterdir() if d.is_dir() and d.name.isdigit())
    cells = {w: {c: scores(args.out / str(w) / f.split("/")[0] / f"seed{w}" / f.split("/")[1])
                 for c, f in CELLS.items()} for w in found}
    seeds = [w for w in found if all(cells[w].values())]
    if not seeds:
        sys.exit(f"{args.out}: no world with all six cells finished")
    table = {c: {str(w): cells[w][c] for w in seeds} for c in CELLS}
    column = lambda c, k: [table[c][str(w)][k] for w in seeds]
    summary = {c: {k: {"mean": statistics.mean(column(c, k)), "std": statistics.stdev(column(c, k))
                       if len(seeds) > 1 else 0.0} for k in COLS} for c in CELLS}
    vs = {f"{a} - {b}": {k: paired([x - y for x, y in zip(column(a, k), column(b, k))]) for k in COLS}
          for a, b in PRIMARY + SECONDARY}
    partial = args.worlds is not None and len(seeds) < args.worlds
    ci = lambda d, f=2: f"[{d['ci95'][0]:+.{f}f}, {d['ci95'][1]:+.{f}f}]" if d["ci95"] else ""
    md = (f"{len(seeds)} worlds with all six cells ({seeds[0]}-{seeds[-1]}; "
          f"{len(found) - len(seeds)} more begun)" + (f", **PARTIAL: {len(seeds)} of {args.worlds} worlds, "
                                                      f"descriptive, not the verdict**" if partial else "") + ".\n\n")
    md += ("| cell | en (source) | de | ja | ru | tr | target avg |\n|---|---|---|---|---|---|---|\n"
           + "".join(f"| {c} | " + " | ".join(f"{summary[c][k]['mean']:.1f} ± {summary[c][k]['std']:.1f}"
                                              for k in COLS) + " |\n" for c in CELLS))
    md += "\n| paired, target avg | Δ | 95% CI | wins |\n|---|---|---|---|\n"
    for i, (key, d) in enumerate(vs.items()):
        d = d["avg"]
        kind = "primary" if i < len(PRIMARY) else "secondary"
        md += f"| `{key}` ({kind}) | {d['mean']:+.2f} | {ci(d)} | {d['wins']}/{d['n']} |\n"
    md += "\nPer language (Δ [95% CI] wins):\n\n| | " + " | ".join(COLS[:-1]) + " |\n" + "|---" * len(COLS) + "|\n"
    for key, d in vs.items():
        md += (f"| `{key}` | " + " | ".join(f"{d[l]['mean']:+.1f} {ci(d[l], 1)} {d[l]['wins']}" for l in COLS[:-1])
               + " |\n")
    report = {"seeds": seeds, "per_world": True, "scores": table, "summary": summary, "paired": vs,
              "partial": partial}
    if args.worlds:  # the pre-registered rule on both primary comparisons (partial: descriptive)
        report["verdict"] = verdict(report, args.worlds, [f"{a} - {b}" for a, b in PRIMARY])
        md += "\nVerdict (the v4/v5 rule):\n\n" + "".join(f"- {line}\n" for line in report["verdict"])
    print(md)
    if args.save:
        for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", md)):
            atomic_write(Path(args.save + suffix), lambda f: Path(f).write_text(text))


if __name__ == "__main__":
    main()
