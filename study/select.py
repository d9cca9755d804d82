"""The study's selection rule: for each priming method, the grid configuration with the highest selection metric
(dev F1 of the priming languages after fine-tuning on the source; ties: source dev F1). Target-language test F1
is printed for the record only. usage: python study/select.py runs/study/grid"""
import json
import sys
from pathlib import Path

rows = []
for run in sorted(Path(sys.argv[1]).glob("*/experiment.json")):
    r = json.loads(run.read_text())
    method, = r["summary"]
    s = r["summary"][method]
    rows.append((method, run.parent.name, s["select"]["mean"], s["en"]["mean"], s["avg"]["mean"]))
print("| method | configuration | selection (priming-language dev F1) | en test | target avg (not used) |\n|---|---|---|---|---|")
for m, name, sel, en, avg in rows:
    print(f"| {m} | {name} | {sel:.1f} | {en:.1f} | {avg:.1f} |")
for m in dict.fromkeys(r[0] for r in rows):
    best = max((r for r in rows if r[0] == m), key=lambda r: (r[2], r[3]))
    print(f"selected for {m}: {best[1]}")
