"""The study's selection rule: for each priming method, the grid configuration with the highest selection metric
(dev F1 of the priming languages after fine-tuning on the source; ties: source dev F1). Target-language test F1
is printed for the record only. usage: python -m study.analysis.selection runs/study/grid"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("grid", type=Path, help="a folder of grid cells, each an experiment folder (CELL/experiment.json)")
    rows = []
    for run in sorted(ap.parse_args(argv).grid.glob("*/experiment.json")):
        r = json.loads(run.read_text())
        method, = r["summary"]
        s = r["summary"][method]
        rows.append((method, run.parent.name, s["select"]["mean"], s["en"]["mean"], s["avg"]["mean"]))
    print("| method | configuration | selection (priming-language dev F1) | en test | target avg (not used) |\n"
          "|---|---|---|---|---|")
    for m, name, sel, en, avg in rows:
        print(f"| {m} | {name} | {sel:.1f} | {en:.1f} | {avg:.1f} |")
    for m in dict.fromkeys(r[0] for r in rows):
        best = max((r for r in rows if r[0] == m), key=lambda r: (r[2], r[3]))
        print(f"selected for {m}: {best[1]}")


if __name__ == "__main__":
    main()
