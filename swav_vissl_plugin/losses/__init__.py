"""Losses registered with ClassyVision's ``register_loss``."""

from swav_vissl_plugin.losses import swav  # noqa: F401
