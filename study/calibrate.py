"""Testbed calibration on the `none` baseline only: a world with some data.WorldConfig knobs changed, its encoder
pretrained as usual, then `none` on it. Tables in ROOT/none/experiment.md.
usage: python study/calibrate.py ROOT SEED [knob=value ...]   e.g. runs/calib/F 0 p_keep_latin=0.5"""
import ast
import functools
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not study/ (its select.py shadows the stdlib)
import data  # noqa: E402
from study import experiment  # noqa: E402

root, seed, knobs = sys.argv[1], int(sys.argv[2]), dict(kv.split("=", 1) for kv in sys.argv[3:])
# train.testbed() builds the world from data.WorldConfig(seed=...): these knobs change its defaults (--jobs 1: in
# this process, where the change holds)
data.WorldConfig = functools.partial(data.WorldConfig, **{k: ast.literal_eval(v) for k, v in knobs.items()})
experiment.main(["--per-world", "--testbed", root, "--seed", str(seed), "--seeds", "1", "--methods", "none",
                 "--threads", "1", "--jobs", "1", "--out", f"{root}/none"])
