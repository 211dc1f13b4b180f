#!/usr/bin/env python
"""Train a SwAV recipe over a grid of LR x epsilon x batch and tabulate how it learns.

    python tools/recipe_sweep.py [--train FOLDER --val FOLDER] [--output DIR]
        [--config swav_plugin/pretrain/swav_small_images] [--lr-factors 0.25 1 4]
        [--epsilons 0.03 0.05] [--batches 64 256] [--jobs 1] [config.KEY=value ...]

Without --train/--val: the quickstart's MNIST split (4,000 / 1,000 images).
Both folders are <class>/<image> image folders; --val is held out and
labelled (kNN, linear probe, prototypes in use are measured on it). Writes
DIR/sweep.md (table), DIR/sweep.json, DIR/knn_curves.png and one folder per
run under DIR/runs/. See swav_vissl_plugin/recipe_sweep.py and
docs/small_data.md.
"""

import argparse
import sys
import time
from pathlib import Path

from swav_vissl_plugin.quickstart import prepare_image_folder
from swav_vissl_plugin.recipe_sweep import BATCHES, DEFAULT_CONFIG, EPSILONS, LR_FACTORS, markdown_table, sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="training image folder (default: the quickstart's MNIST split)")
    p.add_argument("--val", type=Path, help="held-out labelled image folder (required with --train)")
    p.add_argument("--output", type=Path, default=Path(f"output/sweep-{time.strftime('%Y%m%d-%H%M%S')}"))
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--lr-factors", type=float, nargs="+", default=list(LR_FACTORS))
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("overrides", nargs="*", help="config.KEY=value overrides applied to every run")
    a = p.parse_args(argv)
    if (a.train is None) != (a.val is None):
        p.error("give both --train and --val, or neither (the quickstart's MNIST split)")
    if a.train is None:
        splits = prepare_image_folder(Path("output/quickstart-data"))
    else:
        for flag, folder in (("--train", a.train), ("--val", a.val)):
            if not folder.is_dir():
                p.error(f"{flag} {folder}: not a folder")
        splits = {"train": a.train.resolve(), "val": a.val.resolve()}
    rows = sweep(a.output, splits, a.config, a.overrides, a.lr_factors, a.epsilons, a.batches, a.jobs)
    print(markdown_table(rows))
    print(f"wrote {a.output}/sweep.md, sweep.json, knn_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
