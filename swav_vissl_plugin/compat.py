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


def patch_resume_checkpoint_selection() -> None:
    """Reason: VISSL's launcher resumes from ``get_resume_checkpoint``, which,
    once ``CHECKPOINT_ITER_FREQUENCY > 0``, looks only at ``model_iteration*``
    (a newer phase checkpoint is ignored; with none yet it returns
    ``<dir>/None`` and the run crashes) and never checks that the file loads
    (a truncated newest checkpoint crashes every rank). The plugin's choice:
    the newest readable checkpoint of any kind, warning about each unreadable
    one it passes (swav_vissl_plugin.resume.get_resume_checkpoint)."""
    from vissl.utils import distributed_launcher

    from swav_vissl_plugin.resume import get_resume_checkpoint

    _replace(distributed_launcher, "get_resume_checkpoint", get_resume_checkpoint)


def patch_training_finished_check() -> None:
    """Reason: VISSL's launcher treats a run as finished when any file named
    ``model_final*`` exists, so a damaged final checkpoint ends every relaunch
    without training or resuming. The plugin requires the final checkpoint to
    be readable (swav_vissl_plugin.resume.is_training_finished)."""
    from vissl.utils import distributed_launcher

    from swav_vissl_plugin.resume import is_training_finished

    _replace(distributed_launcher, "is_training_finished", is_training_finished)


def patch_resume_checkpoint_loading() -> None:
    """Reason: VISSL's task reads the resume checkpoint's counters right after
    loading it, with no point where the plugin can adapt them (to another
    world size) or correct VISSL's own off-by-one in ``iteration_num`` after
    an iteration checkpoint. The task loads through
    swav_vissl_plugin.resume.ResumeCheckpointLoader instead (initial-weight
    loading is unchanged)."""
    from vissl.trainer import train_task

    from swav_vissl_plugin.resume import ResumeCheckpointLoader

    _replace(train_task, "CheckpointLoader", ResumeCheckpointLoader)


def patch_trainer_resume_context() -> None:
    """Reason: VISSL loads the resume checkpoint inside the trainer's
    ``train()`` through a class method that is not given the config, which
    the checkpoint's adaptation to the current run needs. The train engine's
    trainer runs ``train()`` inside swav_vissl_plugin.resume.resume_config(cfg)."""
    from vissl.engines import train

    from swav_vissl_plugin.resume import resume_config

    original = ORIGINALS.get((train.__name__, "SelfSupervisionTrainer"), train.SelfSupervisionTrainer)

    class SelfSupervisionTrainer(original):
        __doc__ = original.__doc__

        def train(self):
            with resume_config(self.cfg):
                return super().train()

    _replace(train, "SelfSupervisionTrainer", SelfSupervisionTrainer)


def patch_stateful_sampler() -> None:
    """Reason: the resumable sampler VISSL builds for
    ``USE_STATEFUL_DISTRIBUTED_SAMPLER`` (StatefulDistributedSampler) gives each
    rank a fixed contiguous block of the dataset, shuffled only inside it, so
    a rank never sees the other blocks (the release shuffles the whole dataset
    with DistributedSampler). VISSL builds
    swav_vissl_plugin.resumable_sampler.ResumableDistributedSampler there
    instead: DistributedSampler's order, resumable mid-epoch."""
    from vissl import data

    from swav_vissl_plugin.resumable_sampler import ResumableDistributedSampler

    _replace(data, "StatefulDistributedSampler", ResumableDistributedSampler)


#: the module the forkserver of loader workers imports first
LOADER_PRELOAD = "swav_vissl_plugin.loader_preload"


def patch_forkserver_preload() -> None:
    """Reason: under VISSL's default ``MULTI_PROCESSING_METHOD: forkserver``
    the train engine's ``setup_multiprocessing_method`` leaves the forkserver
    without a preload, so every loader worker, started anew each epoch,
    imports torch, VISSL and the plugin and loads the compiled colour kernel
    itself (3-4 s per worker and epoch on 2 cores). With the plugin the
    forkserver imports swav_vissl_plugin.loader_preload first, and workers
    forked from it start with all of it loaded."""
    import multiprocessing

    from vissl.engines import train

    original = ORIGINALS.get((train.__name__, "setup_multiprocessing_method"), train.setup_multiprocessing_method)

    @functools.wraps(original)
    def setup_multiprocessing_method(method_name: str):
        original(method_name)
        if method_name == "forkserver":
            multiprocessing.set_forkserver_preload([LOADER_PRELOAD])

    _replace(train, "setup_multiprocessing_method", setup_multiprocessing_method)


PATCHES: List[Callable[[], None]] = [
    patch_dataset_catalog_for_explicit_paths,
    patch_resume_checkpoint_selection,
    patch_training_finished_check,
    patch_resume_checkpoint_loading,
    patch_trainer_resume_context,
    patch_stateful_sampler,
    patch_forkserver_preload,
]


def apply_all() -> None:
    for patch in PATCHES:
        if patch.__name__ not in APPLIED:
            patch()
            APPLIED.append(patch.__name__)
