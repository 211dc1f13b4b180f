#!/usr/bin/env python
"""Train or evaluate with VISSL and the SwAV plugin: local processes or Slurm.

    python tools/run_distributed_engines.py config=swav_plugin/pretrain/swav_quickstart \
        config.DISTRIBUTED.NUM_PROC_PER_NODE=2

See swav_vissl_plugin/launcher.py.
"""

import sys

from swav_vissl_plugin.launcher import main

if __name__ == "__main__":
    sys.exit(main())
