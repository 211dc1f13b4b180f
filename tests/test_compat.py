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


FORKSERVER_CHILD = """
import multiprocessing, sys
import swav_vissl_plugin
from swav_vissl_plugin import compat
from vissl.engines import train
setup = train.setup_multiprocessing_method if sys.argv[1] == "patched" else compat.ORIGINALS[(train.__name__, "setup_multiprocessing_method")]
setup("forkserver")
probe = "[name in __import__('sys').modules for name in ('swav_vissl_plugin.loader_preload', 'swav_vissl_plugin.colour_kernel', 'vissl.data')]"
with multiprocessing.Pool(1) as pool:  # the start method setup() chose: forkserver
    print(pool.apply(eval, (probe,)))
"""


@pytest.mark.parametrize("setup, preloaded", [("patched", "[True, True, True]"), ("original", "[False, False, False]")])
def test_loader_workers_fork_from_a_preloaded_forkserver(setup, preloaded):
    """Under forkserver, a worker (as VISSL's loader workers, started anew each
    epoch) starts with the plugin, VISSL's data modules and the compiled
    colour kernel already loaded by the forkserver; VISSL's own setup leaves
    it to import them itself."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORKSERVER_CHILD, setup], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == preloaded
