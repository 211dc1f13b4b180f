"""SwAV, DeepCluster-v2 and SeLa-v2 as a VISSL plugin.

Importing this package *is* the installation into VISSL: it applies the few
compatibility patches VISSL 0.1.6 needs on today's Python/PyTorch
(:mod:`swav_vissl_plugin.compat`), then imports every component module, whose
decorators register them in VISSL's and ClassyVision's registries.
"""

from swav_vissl_plugin import compat

compat.apply_all()

from swav_vissl_plugin import (  # noqa: E402  (registration must follow the patches)
    cluster_hooks,
    clustering,
    data_source,
    heads,
    hooks,
    linear_eval,
    losses,
    nonfinite,
    optim,
    transforms,
    train_step,
    trunks,
)

__version__ = "0.1.0"

#: The names this plugin adds to VISSL's registries, by registry.
REGISTERED = {
    "loss": ["swav_plugin_loss", "deepclusterv2_plugin_loss", "selav2_plugin_loss"],
    "model_head": ["swav_plugin_head", "swav_plugin_linear"],
    "model_trunk": ["swav_plugin_small_cnn"],
    "transform": ["SwavPluginMultiCrop"],
    "collator": ["swav_plugin_multicrop_collator"],
    "optimizer": ["swav_plugin_larc"],
    "param_scheduler": ["swav_plugin_warmup_cosine"],
    "train_step": ["swav_plugin_train_step"],
    "data_source": ["swav_plugin_disk_folder", "swav_plugin_disk_filelist"],
}
