"""A study's finished cells across a change of machine (a new machine starts without runs/): `save` keeps every
finished cell's results.json and config.json of an experiment folder in one JSON file, `restore` writes them back
(existing cells are left alone), so that `experiment` skips them and runs only the cells that never finished.
usage: python study/cells.py save|restore runs/v4/cells study/results/v4-cells.json"""
import json
import sys
from pathlib import Path

what, folder, archive = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if what == "save":
    cells = {str(d.relative_to(folder)): {f: (d / f).read_text() for f in ("results.json", "config.json")}
             for d in sorted(folder.glob("seed*/*")) if (d / "results.json").exists()}
    archive.write_text(json.dumps(cells, indent=1) + "\n")
elif what == "restore":
    cells = json.loads(archive.read_text())
    for cell, files in cells.items():
        if not (folder / cell / "results.json").exists():
            (folder / cell).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "results.json"):  # results.json last: it marks the cell finished
                (folder / cell / name).write_text(files[name])
else:
    sys.exit("usage: python study/cells.py save|restore EXPERIMENT_FOLDER ARCHIVE.json")
print(f"{what}: {len(cells)} cells")
