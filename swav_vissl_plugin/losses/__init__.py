"""Losses registered with ClassyVision's ``register_loss``."""

from swav_vissl_plugin.losses import deepcluster_v2, swav  # noqa: F401
