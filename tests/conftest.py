"""Shared fixtures: the quickstart's real image folder and config composition."""

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory):
    """The quickstart's MNIST sample as an image folder (train/val)."""
    from swav_vissl_plugin.quickstart import prepare_image_folder

    return prepare_image_folder(tmp_path_factory.mktemp("mnist5k"))


@pytest.fixture
def compose_cfg(tmp_path):
    """compose(overrides) on the quickstart config, writing under tmp_path."""
    from swav_vissl_plugin.config import compose

    def _compose(*overrides, config="swav_plugin/pretrain/swav_quickstart", data=None):
        ov = [f"config={config}", f"config.CHECKPOINT.DIR={tmp_path / 'checkpoints'}"]
        if data is not None:
            ov.append(f"config.DATA.TRAIN.DATA_PATHS=[{data}]")
        return compose(ov + list(overrides), dump_config=False)[1]

    return _compose
