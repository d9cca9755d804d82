"""A study's finished cells across a change of machine (a new machine starts without runs/): `save` keeps every
finished cell's results.json and config.json of an experiment folder in one JSON file, `restore` writes them back
(existing cells are left alone), so that `experiment` skips them and runs only the cells that never finished.
usage: python -m study.analysis.cells save|restore runs/v4/cells study/results/v4-cells.json"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("what", choices=("save", "restore"))
    ap.add_argument("folder", type=Path, help="the experiment folder (its --out)")
    ap.add_argument("archive", type=Path, help="the JSON file of the cells")
    args = ap.parse_args(argv)
    folder = args.folder
    if args.what == "save":
        cells = {str(d.relative_to(folder)): {f: (d / f).read_text() for f in ("results.json", "config.json")}
                 for d in sorted(folder.glob("seed*/*")) if (d / "results.json").exists()}
        args.archive.write_text(json.dumps(cells, indent=1) + "\n")
    else:
        cells = json.loads(args.archive.read_text())
        for cell, files in cells.items():
            if not (folder / cell / "results.json").exists():
                (folder / cell).mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "results.json"):  # results.json last: it marks the cell finished
                    (folder / cell / name).write_text(files[name])
    print(f"{args.what}: {len(cells)} cells")


if __name__ == "__main__":
    main()
