"""The few patches VISSL 0.1.6 needs on Python 3.11 + PyTorch 2.x.

Applied by ``import swav_vissl_plugin`` (so also in spawned workers and Slurm
jobs, which re-import modules). Each patch is one function below with its
reason, is idempotent, replaces one attribute of one VISSL module, and keeps
the original in :data:`ORIGINALS` so a test can show the failure it fixes.
Nothing in site-packages is edited.
"""

import functools
from typing import Callable, Dict, List, Tuple

#: (module name, attribute) -> the original object, for patched attributes.
ORIGINALS: Dict[Tuple[str, str], object] = {}
#: Names of the patches applied so far, in order.
APPLIED: List[str] = []


def _replace(module, attr: str, new) -> None:
    key = (module.__name__, attr)
    if key not in ORIGINALS:
        ORIGINALS[key] = getattr(module, attr)
    setattr(module, attr, new)


def patch_dataset_catalog_for_explicit_paths() -> None:
    """Reason: with DATA.<split>.DATA_PATHS given and no LABEL_PATHS, VISSL still
    looks the dataset name up in its catalog for a label file and raises
    KeyError for any name that is not registered there."""
    from vissl.data import dataset_catalog

    original = ORIGINALS.get((dataset_catalog.__name__, "get_data_files"), dataset_catalog.get_data_files)

    @functools.wraps(original)
    def get_data_files(split, dataset_config):
        cfg = dataset_config[split]
        if len(cfg.DATA_PATHS) > 0 and len(cfg.LABEL_PATHS) == 0:
            catalog = dataset_catalog.VisslDatasetCatalog
            for name in cfg.DATASET_NAMES:
                if not catalog.has_data(name):
                    # A catalog entry without label files: the explicit paths are used.
                    catalog.register_data(name, {"train": ["", ""], "val": ["", ""]})
        return original(split, dataset_config)

    _replace(dataset_catalog, "get_data_files", get_data_files)


PATCHES: List[Callable[[], None]] = [
    patch_dataset_catalog_for_explicit_paths,
]


def apply_all() -> None:
    for patch in PATCHES:
        if patch.__name__ not in APPLIED:
            patch()
            APPLIED.append(patch.__name__)
