"""Testbed calibration on the `none` baseline only: a world with some data.WorldConfig knobs changed, its encoder
pretrained as usual, then `none` on it. Tables in ROOT/none/experiment.md.
usage: python -m study.stages.calibrate ROOT SEED [knob=value ...]   e.g. runs/calib/F 0 p_keep_latin=0.5"""
import argparse
import ast
import functools

import data
from study import experiment


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the world's testbed root and, in ROOT/none, its `none` cell")
    ap.add_argument("seed", type=int, help="the world's seed")
    ap.add_argument("knobs", nargs="*", metavar="knob=value", help="data.WorldConfig fields to change")
    args = ap.parse_args(argv)
    knobs = dict(kv.split("=", 1) for kv in args.knobs)
    # train.testbed() builds the world from data.WorldConfig(seed=...): these knobs change its defaults (--jobs 1:
    # in this process, where the change holds)
    data.WorldConfig = functools.partial(data.WorldConfig, **{k: ast.literal_eval(v) for k, v in knobs.items()})
    experiment.main(["--per-world", "--testbed", args.root, "--seed", str(args.seed), "--seeds", "1", "--methods",
                     "none", "--threads", "1", "--jobs", "1", "--out", f"{args.root}/none"])


if __name__ == "__main__":
    main()
