"""Testbed calibration on the `none` baseline only: a world with some data.WorldConfig knobs changed, its encoder
pretrained as usual, then `none` on it. Tables in ROOT/none/experiment.md.
usage: python study/calibrate.py ROOT SEED [knob=value ...]   e.g. runs/calib/F 0 p_keep_latin=0.5"""
import ast
import os
import shutil
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not study/ (its select.py shadows the stdlib)
import data  # noqa: E402
import train  # noqa: E402

root, seed, knobs = sys.argv[1], int(sys.argv[2]), dict(kv.split("=", 1) for kv in sys.argv[3:])
world = Path(f"{root}-{seed}")
if not (world / "data" / "tokenizer.json").exists():  # train.testbed() then only pretrains the encoder
    cfg = data.WorldConfig(seed=seed, **{k: ast.literal_eval(v) for k, v in knobs.items()})
    shutil.rmtree(world / "data.tmp", ignore_errors=True)
    data.make_world(world / "data.tmp", cfg)
    data.write_tokenizer(world / "data.tmp")
    os.replace(world / "data.tmp", world / "data")
train.main(["--stage", "experiment", "--per-world", "--testbed", root, "--seed", str(seed), "--seeds", "1",
            "--methods", "none", "--threads", "1", "--jobs", "1", "--out", f"{root}/none"])
