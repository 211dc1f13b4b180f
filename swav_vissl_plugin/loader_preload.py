"""What every data-loader worker needs, loaded once in the forkserver.

Under ``MULTI_PROCESSING_METHOD: forkserver`` (the plugin's configs) VISSL
starts new loader workers every epoch, each forked from a forkserver
process. :func:`swav_vissl_plugin.compat.patch_forkserver_preload` makes
that forkserver import this module first, so the workers forked from it
already hold the plugin (its registrations, VISSL's and torch's modules) and
the compiled colour kernel. Without it each worker imports them and loads
the kernel anew every epoch: 3-4 s of a loader's start on 2 cores, which is
a fifth to a quarter of a quickstart epoch (docs/performance.md, "Loader workers").
"""

import swav_vissl_plugin  # noqa: F401  (registrations, patches, VISSL's data modules)
from swav_vissl_plugin.transforms import warm_colour_kernel

try:
    warm_colour_kernel()
except Exception:  # noqa: BLE001  (the transform, when it is built, reports a bad setting)
    pass
