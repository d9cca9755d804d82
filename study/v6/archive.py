"""Study v6's finished worlds kept across machines (PROTOCOL.md, section 5, note of the study's start): a session's
machine may be replaced, and its run folder with it. At each stop `save` copies the scores of every world whose six
cells have finished into ARCHIVE/WORLD.json, with the CPU they ran on; a world already archived is kept as it was
(its first, complete run). `restore` writes the archived worlds back as results.json files in run.sh's layout, so
that study.v6.table reads them as one folder. A world's six cells always come from one machine.

    python -m study.v6.archive save /work/study6/runs/v6/study          # at each stop; commit study/v6/cells
    python -m study.v6.archive restore runs/v6/pooled && python -m study.v6.table runs/v6/pooled --worlds 340
"""
import argparse
import json
import platform
from pathlib import Path

from model import atomic_write
from study.v6.table import CELLS

ARCHIVE = Path(__file__).parent / "cells"
KEPT = ("f1", "target_avg_f1", "dev_f1")  # what the table reads, and the model selection's score


def results_path(out, world, cell):
    """Where run.sh's cell `cell` of `world` leaves its results.json under run folder `out`."""
    folder, method = CELLS[cell].split("/")
    return Path(out) / str(world) / folder / f"seed{world}" / method / "results.json"


def cpu():
    """The CPU's model name (cells reproduce bit for bit on the same one), or the platform's processor."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return names[0] if names else platform.processor()


def save(out, archive=ARCHIVE):
    """Archive every world of run folder `out` whose six cells have finished and that is not archived yet; returns
    the worlds archived now."""
    if not Path(out).is_dir():
        raise SystemExit(f"{out}: no such run folder")
    archive.mkdir(parents=True, exist_ok=True)
    new = []
    for world in sorted(int(d.name) for d in Path(out).iterdir() if d.is_dir() and d.name.isdigit()):
        paths = {cell: results_path(out, world, cell) for cell in CELLS}
        target = archive / f"{world}.json"
        if target.exists() or not all(p.exists() for p in paths.values()):
            continue
        cells = {cell: {k: json.loads(p.read_text())[k] for k in KEPT} for cell, p in paths.items()}
        record = {"world": world, "cpu": cpu(), "cells": cells}
        atomic_write(target, lambda f: Path(f).write_text(json.dumps(record, indent=1) + "\n"))
        new.append(world)
    return new


def restore(dest, archive=ARCHIVE):
    """Write every archived world's cells into run folder `dest` as results.json files; returns the worlds."""
    worlds = []
    for file in sorted(archive.glob("*.json")):
        record = json.loads(file.read_text())
        for cell, scores in record["cells"].items():
            path = results_path(dest, record["world"], cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(scores) + "\n")
        worlds.append(record["world"])
    return worlds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["save", "restore"], help="save: run folder -> archive; restore: the reverse")
    p.add_argument("folder", type=Path, help="run.sh's folder (runs/v6/study), or where to restore to")
    p.add_argument("--archive", type=Path, default=ARCHIVE, help=f"the archive (default: {ARCHIVE})")
    args = p.parse_args(argv)
    worlds = (save if args.action == "save" else restore)(args.folder, args.archive)
    print(f"{args.action}: {len(worlds)} world(s)" + (f", {worlds[0]}-{worlds[-1]}" if worlds else ""))


if __name__ == "__main__":
    main()
