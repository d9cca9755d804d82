"""v6 calibration table and selection (study/v6/PROTOCOL.md, section 1), from the cells of study/v6/calibrate.sh.

    python -m study.v6.calibration runs/v6/calib [--save study/results/v6-calibration]

Score of a Houlsby configuration: its mean source (en) dev F1 over the calibration worlds. Selected: among those
within 0.5 F1 of the best score, the smallest adapter, then the highest score. Target F1 is printed for the record and
for the fairness check (the band of v5's `none -> lora` target average) only; the rule never reads it. With cells
missing, the table is marked partial and nothing is selected.
"""
import argparse
import json
import re
import statistics
from pathlib import Path

WORLDS, SIZES, LRS = (401, 402, 403), (16, 32, 64), ("1e-3", "3e-3", "1e-2")
TARGETS, MARGIN, EN_BOUND = ("de", "ja", "ru", "tr"), 0.5, 75.0


def cell(folder):
    """A finished cell's scores (F1 x 100), and when its fine-tuning kept its best checkpoint; None if not finished."""
    path = folder / "results.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    evals = [(m["step"], m["dev_f1"]) for m in map(json.loads, (folder / "finetune" / "metrics.jsonl").open())
             if "dev_f1" in m]
    best = max(evals, key=lambda e: e[1])  # the first of equals, as fine-tuning keeps it
    return ({"dev_en": 100 * r["dev_f1"]["en"], "en": 100 * r["f1"]["en"], "avg": 100 * r["target_avg_f1"]}
            | {l: 100 * r["f1"][l] for l in TARGETS} | {"best_step": best[0], "last_step": evals[-1][0]})


def lora_band(v5):
    """v5's 160 `none -> lora` target averages: mean, sd, 10th and 90th percentiles (descriptive)."""
    avg = sorted(s["avg"] for s in json.loads(Path(v5).read_text())["scores"]["none"].values())
    n = len(avg)
    return {"n": n, "mean": statistics.mean(avg), "sd": statistics.stdev(avg), "p10": avg[n // 10],
            "p90": avg[9 * n // 10]}


def select(scores):
    """The rule: among configurations within MARGIN of the best score, the smallest adapter, then the best score."""
    best = max(scores.values())
    near = [c for c, s in scores.items() if s >= best - MARGIN]
    return min(near, key=lambda c: (int(re.search(r"-a(\d+)-", c)[1]), -scores[c]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="calibrate.sh's folder (runs/v6/calib)")
    p.add_argument("--v5", default=Path(__file__).parents[1] / "results" / "v5.json", help="v5's table (the band)")
    p.add_argument("--save", help="write PREFIX.md and PREFIX.json")
    args = p.parse_args(argv)
    configs = ["lora"] + [f"houlsby-a{s}-lr{lr}" for s in SIZES for lr in LRS]
    cells = {c: {w: cell(args.out / c / str(w) / f"seed{w}" / "none") for w in WORLDS} for c in configs}
    done = {c: {w: v for w, v in ws.items() if v} for c, ws in cells.items()}
    mean = lambda c, k: statistics.mean(v[k] for v in done[c].values())
    complete = all(len(ws) == len(WORLDS) for ws in done.values())
    band = lora_band(args.v5)
    chosen = select({c: mean(c, "dev_en") for c in configs[1:]}) if complete else None

    cols = ["dev_en", "en"] + list(TARGETS) + ["avg"]
    md = ("| configuration | worlds | en dev (selection) | en test | " + " | ".join(TARGETS) + " | target avg | "
          "target avg - LoRA, paired | fine-tuning: best step / last step |\n" + "|---" * (len(cols) + 4) + "|\n")
    for c in configs:
        if not done[c]:
            md += f"| {c} | 0 |" + " |" * (len(cols) + 2) + "\n"
            continue
        paired = [v["avg"] - done["lora"][w]["avg"] for w, v in done[c].items() if w in done["lora"]]
        steps = ", ".join(f"{v['best_step']}/{v['last_step']}" for v in done[c].values())
        name = f"**{c}** (selected)" if c == chosen else c
        md += (f"| {name} | {len(done[c])} | " + " | ".join(f"{mean(c, k):.1f}" for k in cols)
               + f" | {'' if c == 'lora' or not paired else f'{statistics.mean(paired):+.1f}'} | {steps} |\n")
    md += (f"\nF1 x100, mean over worlds {', '.join(map(str, WORLDS))} (`none`, one run per cell). LoRA: the v5 "
           f"recipe, for reference only. The band of v5's {band['n']} `none -> lora` cells (descriptive): target avg "
           f"mean {band['mean']:.1f}, sd {band['sd']:.1f}, 10th-90th percentile [{band['p10']:.1f}, "
           f"{band['p90']:.1f}].\n")
    if not complete:
        md += "\n**Partial** (descriptive): cells are missing, nothing is selected.\n"
    else:
        en_ok = all(v["en"] >= EN_BOUND for v in done[chosen].values())
        avg = mean(chosen, "avg")
        in_band = band["p10"] <= avg <= band["p90"]
        md += (f"\nSelected by the rule (mean en dev F1; within {MARGIN} of the best, the smallest adapter, then the "
               f"best): **{chosen}**. en test >= {EN_BOUND:.0f} on every world: {'yes' if en_ok else 'NO'}; target "
               f"avg {avg:.1f} {'inside' if in_band else 'OUTSIDE'} LoRA's band [{band['p10']:.1f}, "
               f"{band['p90']:.1f}].\n")
    print(md)
    if args.save:
        Path(args.save + ".md").write_text(md)
        Path(args.save + ".json").write_text(json.dumps({"cells": cells, "band": band, "selected": chosen}, indent=1)
                                             + "\n")


if __name__ == "__main__":
    main()
