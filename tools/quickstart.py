#!/usr/bin/env python
"""`make quickstart`: SwAV on CPU on a shipped MNIST sample, then a linear probe.

    python tools/quickstart.py [--output DIR] [config.KEY=value ...]
"""

import argparse
import sys
import time

from swav_vissl_plugin.quickstart import run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=f"output/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("overrides", nargs="*", help="extra config.KEY=value overrides")
    a = p.parse_args()
    run(a.output, a.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
