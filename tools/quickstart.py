#!/usr/bin/env python
"""`make quickstart`: self-supervised pretraining on CPU on a shipped MNIST
sample, then a linear probe, the kNN monitor and the prototype gallery.

    python tools/quickstart.py [--method swav|deepclusterv2|selav2] [--output DIR] [config.KEY=value ...]

Three methods side by side (README, "Three methods side by side"), each on
the same data and budget, over several seeds, with a table of the results:

    python tools/quickstart.py --all [--seeds 0,1,2] [--jobs 2] [--output DIR]
"""

import argparse
import sys
import time

from swav_vissl_plugin.quickstart import METHODS, run


def seed_list(text: str):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", action="append", choices=list(METHODS),
                   help="the method whose small-image recipe to train (default: swav); "
                        "give it several times to compare methods")
    p.add_argument("--all", action="store_true", help="every method: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...",
                   help="seeds (config.SEED_VALUE), comma-separated; several are compared in one table "
                        "(--all: default 0,1,2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time in a comparison, each with cores / jobs threads (default 1)")
    p.add_argument("--output", default=None,
                   help="output folder (default output/quickstart-<time>, output/comparison-<time> for a table)")
    p.add_argument("overrides", nargs="*", help="extra config.KEY=value overrides, for every run")
    a = p.parse_args()
    methods = list(METHODS) if a.all else list(dict.fromkeys(a.method or ["swav"]))
    seeds = a.seeds if a.seeds is not None else ([0, 1, 2] if a.all else None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if len(methods) == 1 and (seeds is None or len(seeds) == 1):
        overrides = list(a.overrides) + ([f"config.SEED_VALUE={seeds[0]}"] if seeds else [])
        run(a.output or f"output/quickstart-{stamp}", overrides, method=methods[0])
        return 0
    from swav_vissl_plugin.method_comparison import compare

    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: expected at least 1")
    compare(a.output or f"output/comparison-{stamp}", methods, seeds or [0], a.jobs, a.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
