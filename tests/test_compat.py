"""Each compatibility patch fixes a failure that VISSL 0.1.6 shows without it."""

import pytest
from vissl.config import AttrDict

from swav_vissl_plugin import compat


def _data_config(path):
    split = dict(
        DATA_SOURCES=["disk_folder"],
        DATASET_NAMES=["swav_plugin_test_unregistered_name"],
        DATA_PATHS=[str(path)],
        LABEL_SOURCES=[],
        LABEL_PATHS=[],
        COPY_TO_LOCAL_DISK=False,
    )
    return AttrDict({"TRAIN": split})


def test_every_patch_is_applied_once():
    assert compat.APPLIED == [p.__name__ for p in compat.PATCHES]
    compat.apply_all()
    assert compat.APPLIED == [p.__name__ for p in compat.PATCHES]


def test_explicit_data_paths_need_no_catalog_entry(tmp_path):
    from vissl.data import dataset_catalog

    original = compat.ORIGINALS[(dataset_catalog.__name__, "get_data_files")]
    name = "swav_plugin_test_unregistered_name"
    assert not dataset_catalog.VisslDatasetCatalog.has_data(name)
    with pytest.raises(KeyError, match="not registered"):
        original("TRAIN", _data_config(tmp_path))
    data, labels = dataset_catalog.get_data_files("TRAIN", _data_config(tmp_path))
    assert data == [str(tmp_path)] and labels == []
