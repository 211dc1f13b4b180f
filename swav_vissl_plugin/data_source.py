"""Image folder / file list data sources that survive bad files, as VISSL plugins.

Implements the "Bad inputs" requirements of the checkpoints-and-failures
work and the per-sample augmentation streams of ``sample_seed.py``; user
documentation: ``docs/data.md``.

What is computed
----------------
Two data sources, registered in VISSL's ``DATASET_SOURCE_MAP`` (and in
``DATA_SOURCES_WITH_SUBSET_SUPPORT``, so ``DATA_LIMIT`` works as with VISSL's
own) and used as ``config.DATA.<split>.DATA_SOURCES``:

* ``swav_plugin_disk_folder``: the images under ``<path>/<class>/...`` in the
  order of VISSL's ``disk_folder`` (torchvision's ``ImageFolder``: class
  folders sorted, then a sorted walk of each, files with an image extension);
* ``swav_plugin_disk_filelist``: the image paths listed in a ``.npy`` file,
  as VISSL's ``disk_filelist`` (``MMAP_MODE``, ``REMOVE_IMG_PATH_PREFIX`` /
  ``NEW_IMG_PATH_PREFIX``).

Paths come from ``DATA_PATHS`` or, when it is empty, from VISSL's dataset
catalog, as for VISSL's sources. ``source[idx]`` returns ``(image, valid)``
(what VISSL's ``GenericSSLDataset`` expects):

* every readable image is converted to 8-bit RGB by :func:`image_to_rgb`
  (see there: alpha composited over white, palette with or without
  transparency, CMYK, 1-bit, grayscale, 16-bit and float modes rescaled
  instead of clipped), whatever its size: an image smaller than the crops
  goes through the multi-crop transform, which upsamples it;
* a file that cannot be decoded (zero bytes, not an image, truncated,
  corrupt) is logged as a warning naming the file and the error, and
  replaced by the next readable item (``idx + 1``, ``idx + 2``, ... modulo the
  dataset length), with ``valid=False``, so the batch keeps its shape and
  VISSL marks the sample ``data_valid = -1``. A truncated JPEG counts as
  unreadable: PIL's default (``ImageFile.LOAD_TRUNCATED_IMAGES = False``)
  raises, and a partly grey image would teach the crops a fake pattern.
  More than :data:`MAX_REPLACEMENT_ATTEMPTS` unreadable items in a row stop
  the run with an error;
* before returning, ``__getitem__`` opens the per-sample random stream of
  ``(SEED_VALUE, epoch, idx)`` (:func:`swav_vissl_plugin.sample_seed.begin_sample`),
  which the multi-crop transform, applied next by ``GenericSSLDataset`` in
  the same process, draws its crops from. ``epoch`` is what VISSL's task
  passes to ``set_epoch`` (its phase index, the sampler's epoch) in the main
  process before it creates the epoch's loader iterator, which pickles the
  source into fresh workers; so a sample's crops depend on (seed, epoch,
  index) only, not on the number of workers or ranks, nor on where a resumed
  epoch starts. A replaced sample keeps the stream of its own index.

Files in a class folder without an image extension are not items (as with
``ImageFolder``); they are listed in one warning when the source is built.

:func:`check_data_paths` checks, for every split a run uses and every
disk source (these and VISSL's), that its path resolves (``DATA_PATHS`` or
the catalog), exists and holds at least one image, raising a
:class:`~swav_vissl_plugin.config.ConfigError` naming the config key and the
path. ``config.compose`` runs it for a run's config, before any rank or
loader worker starts; the sources' constructors run it again for their own
path.

:class:`UnreadableImagesHook` (main process of every rank) counts the
samples of each phase that arrived with ``data_valid = -1``, names their
files (warning on the rank that saw them), and at the end of the phase logs
the count over all ranks with the file names (rank 0's ``log.txt``) and
writes it to TensorBoard as ``Data/unreadable_images`` (step = training
phase).
"""

import logging
import os
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from iopath.common.file_io import g_pathmgr
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from swav_vissl_plugin import sample_seed
from swav_vissl_plugin.hooks import NoopHook
from swav_vissl_plugin.transforms import to_rgb

__all__ = [
    "FOLDER_SOURCE",
    "FILELIST_SOURCE",
    "PLUGIN_SOURCES",
    "MAX_REPLACEMENT_ATTEMPTS",
    "BACKGROUND",
    "image_to_rgb",
    "load_rgb",
    "scan_image_folder",
    "data_paths",
    "check_data_paths",
    "DiskImageSource",
    "UnreadableImagesHook",
]

FOLDER_SOURCE = "swav_plugin_disk_folder"
FILELIST_SOURCE = "swav_plugin_disk_filelist"
PLUGIN_SOURCES = (FOLDER_SOURCE, FILELIST_SOURCE)
#: VISSL's own disk sources, whose paths :func:`check_data_paths` checks too.
_FOLDER_KINDS = (FOLDER_SOURCE, "disk_folder")
_FILELIST_KINDS = (FILELIST_SOURCE, "disk_filelist")
#: Unreadable items in a row after which ``__getitem__`` gives up.
MAX_REPLACEMENT_ATTEMPTS = 1000
#: What transparent pixels are composited over.
BACKGROUND = (255, 255, 255)
#: How many file names one warning lists before "and N more".
_MAX_NAMED = 50
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------
def _scale_to_uint8(arr: np.ndarray, unit_range: bool) -> np.ndarray:
    """Integer or float pixel values as 0..255: kept when already in 0..255
    (``[0, 1]`` floats times 255 when ``unit_range``), 16-bit ranges divided by
    257, anything else stretched linearly from [min, max]."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if unit_range and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif lo >= 0.0 and hi <= 65535.0:
        out = arr / 257.0
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.clip(arr, 0.0, 255.0)
    return np.floor(out + 0.5).astype(np.uint8)


def image_to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB PIL image, for every mode PIL decodes.

    * RGB: unchanged;
    * transparency (RGBA, LA, PA, premultiplied RGBa/La, palette or L/RGB
      images with a ``transparency`` entry): alpha-composited over white
      (:data:`BACKGROUND`), i.e. ``round(a c + (1 - a) 255)`` with
      ``a = alpha / 255``, rather than dropping alpha, which would show the
      arbitrary colours stored under transparent pixels;
    * palette without transparency: the palette's colours;
    * L, 1 (0 or 255), CMYK (``255 (1 - C)(1 - K)`` per channel with C, K
      in [0, 1]; no colour profile applied), YCbCr, ...: PIL's conversion,
      grey replicated;
    * 16-bit (``I;16*``): ``round(v / 257)`` (``transforms.to_rgb``);
    * ``I`` (32-bit integers) and ``F`` (float): values already in 0..255 kept
      (``F`` in [0, 1] times 255), in 0..65535 divided by 257, otherwise
      stretched from [min, max] to [0, 255]; NaN and infinities count as 0.

    Raises ``ValueError`` for a mode PIL cannot convert (then the file is
    treated as unreadable).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F"):
        arr = _scale_to_uint8(np.asarray(img), unit_range=mode == "F")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        if mode.startswith("I;16"):
            img = to_rgb(img)
        try:
            rgba = img.convert("RGBA")
        except ValueError:  # no direct route (e.g. premultiplied La)
            rgba = img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return to_rgb(img)


def load_rgb(path: Union[str, BinaryIO]) -> Image.Image:
    """Open, fully decode and convert one image file (a path, or an open
    binary file) to RGB; raises on any defect (PIL's
    ``UnidentifiedImageError`` for empty or non-image files, ``OSError`` for
    truncated data, ...).

    An RGB image is returned as decoded: torchvision's ``pil_loader``, which
    VISSL's datasets and the release use, calls ``convert("RGB")``, which
    for an RGB image is a copy of the whole image (0.4 ms of a 2 ms decode
    of a 500x375 JPEG)."""
    if hasattr(path, "read"):
        return _decode_rgb(path)
    with g_pathmgr.open(path, "rb") as f:
        return _decode_rgb(f)


def _decode_rgb(f: BinaryIO) -> Image.Image:
    img = Image.open(f)
    img.load()  # decode here, while the file is open and inside the caller's try
    return image_to_rgb(img)


# --------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_folders(root: str) -> List[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _walk_class(root: str, name: str) -> Iterator[Tuple[str, bool]]:
    """(path relative to ``root``, has an image extension) for every file of
    class folder ``name``, in ``ImageFolder``'s order."""
    for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
        rel_dir = os.path.relpath(dirpath, root)
        for fname in sorted(fnames):
            yield os.path.join(rel_dir, fname), _is_image_name(fname)


def scan_image_folder(root: str) -> Tuple[List[str], List[int], List[str], List[str]]:
    """The items of an image folder, in VISSL ``disk_folder``'s order.

    Returns ``(images, labels, classes, ignored)``: image paths relative to
    ``root``, their class indices, the sorted class folder names, and the
    files (relative paths) that are not items: no image extension, or lying
    directly in ``root``."""
    classes = _class_folders(root)
    with os.scandir(root) as entries:
        ignored = sorted(e.name for e in entries if not e.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for rel, is_image in _walk_class(root, name):
            if is_image:
                images.append(rel)
                labels.append(label)
            else:
                ignored.append(rel)
    return images, labels, classes, ignored


def _folder_has_image(root: str) -> bool:
    return any(is_image for name in _class_folders(root) for _, is_image in _walk_class(root, name))


def _load_filelist(path: str, mmap: bool) -> np.ndarray:
    from vissl.utils.io import load_file

    return np.asarray(load_file(path, mmap_mode="r" if mmap else None))


def _named(paths: Sequence[str]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_NAMED])
    more = len(paths) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------
# data path checks
# --------------------------------------------------------------------------
def _splits_in_use(cfg) -> List[str]:
    splits = []
    if not cfg.get("TEST_ONLY", False):
        splits.append("TRAIN")
    if cfg.get("TEST_MODEL", False) or cfg.get("TEST_ONLY", False):
        splits.append("TEST")
    return splits


def data_paths(cfg, split: str) -> List[Tuple[str, str, str, Optional[str]]]:
    """``(config key, source, dataset name, path)`` of each disk source of
    ``split``: the path from ``DATA.<split>.DATA_PATHS``, or, when that list is
    empty, from VISSL's dataset catalog (``None`` when the name is not
    registered there)."""
    from vissl.data.dataset_catalog import VisslDatasetCatalog

    data = cfg.DATA[split]
    sources = list(data.DATA_SOURCES or [])
    names = list(data.DATASET_NAMES or [])
    given = list(data.DATA_PATHS or [])
    out = []
    for i, source in enumerate(sources):
        if source not in _FOLDER_KINDS + _FILELIST_KINDS:
            continue
        name = names[i] if i < len(names) else None
        if given:
            key = f"DATA.{split}.DATA_PATHS[{i}]"
            path = str(given[i]) if i < len(given) else None
        else:
            key = f"DATA.{split}.DATASET_NAMES[{i}]"
            path = None
            if name is not None and VisslDatasetCatalog.has_data(name):
                entry = VisslDatasetCatalog.get(name)["train" if split == "TRAIN" else "val"]
                path = str(entry[0]) if entry else None
        out.append((key, source, name, path))
    return out


def _check_path(key: str, source: str, name: Optional[str], path: Optional[str], split: str, cfg=None) -> None:
    from swav_vissl_plugin.config import _fail

    if path is None or path == "":
        if key.startswith(f"DATA.{split}.DATASET_NAMES"):
            _fail(
                f"DATA.{split}.DATA_PATHS",
                f"is empty and dataset {name!r} ({key}) is not in VISSL's dataset catalog "
                f"(VISSL_DATASET_CATALOG_PATH); set config.DATA.{split}.DATA_PATHS=[/path/to/images]",
            )
        _fail(key, f"no path for data source {source!r}")
    local = "://" not in path
    if source in _FOLDER_KINDS:
        if not g_pathmgr.isdir(path):
            what = "is not a folder" if g_pathmgr.exists(path) else "does not exist"
            _fail(key, f"image folder {path} {what} (data source {source})")
        if local and not _folder_has_image(path):
            with os.scandir(path) as entries:
                loose = sum(1 for e in entries if e.is_file() and _is_image_name(e.name))
            hint = f"; its {loose} image(s) lie directly in it: move them into a class folder" if loose else ""
            _fail(
                key,
                f"image folder {path} holds no image: expected {path}/<class>/<image> with an "
                f"extension in {', '.join(IMG_EXTENSIONS)} (data source {source}){hint}",
            )
    else:
        if not g_pathmgr.isfile(path):
            _fail(key, f"file list {path} does not exist (data source {source})")
        mmap = bool(cfg.DATA[split].get("MMAP_MODE", False)) if cfg is not None else False
        try:
            n = len(_load_filelist(path, mmap))
        except Exception as e:  # noqa: BLE001  (any unreadable list is a config error)
            _fail(key, f"file list {path} cannot be read: {type(e).__name__}: {e}")
        if n == 0:
            _fail(key, f"file list {path} is empty (data source {source})")


def check_data_paths(cfg) -> None:
    """Check every disk data path a run of ``cfg`` reads (see the module
    docstring); raises ``ConfigError`` naming the key and the path."""
    for split in _splits_in_use(cfg):
        for key, source, name, path in data_paths(cfg, split):
            _check_path(key, source, name, path, split, cfg)


# --------------------------------------------------------------------------
# the data source
# --------------------------------------------------------------------------
class DiskImageSource(torch.utils.data.Dataset):
    """``swav_plugin_disk_folder`` / ``swav_plugin_disk_filelist`` (see the
    module docstring). Constructed by VISSL's ``GenericSSLDataset`` with
    ``(cfg, path, split, dataset_name, data_source)``."""

    def __init__(self, cfg, data_source: str, path: str, split: str, dataset_name: str):
        if data_source not in PLUGIN_SOURCES:
            raise ValueError(f"data_source must be one of {PLUGIN_SOURCES}, got {data_source!r}")
        split = split.upper()
        # the config key of this path, for errors (the first source of this kind and name)
        key = next(
            (k for k, s, n, _ in data_paths(cfg, split) if s == data_source and n == dataset_name),
            f"DATA.{split}.DATA_PATHS",
        )
        _check_path(key, data_source, dataset_name, path, split, cfg)
        self.data_source = data_source
        self.split = split
        self.dataset_name = dataset_name
        self._path = str(path)
        self.seed = int(cfg.SEED_VALUE)
        self.epoch = 0
        data = cfg.DATA[split]
        self._mmap = bool(data.get("MMAP_MODE", False))
        self._remove_prefix = data.get("REMOVE_IMG_PATH_PREFIX", "") or ""
        self._new_prefix = data.get("NEW_IMG_PATH_PREFIX", "") or ""
        self._files: Optional[np.ndarray] = None
        if data_source == FOLDER_SOURCE:
            images, labels, classes, ignored = scan_image_folder(self._path)
            # bytes: a compact array that pickles fast into every loader worker
            self._files = np.array([os.fsencode(p) for p in images])
            self.labels = np.asarray(labels, dtype=np.int64)
            self.classes = classes
            self._num = len(images)
            if ignored:
                logging.warning(
                    "%s %s: %d file(s) are not images (no image extension, or outside a class "
                    "folder) and are skipped: %s",
                    data_source, self._path, len(ignored), _named(ignored),
                )
            logging.info("%s: %d images in %d class folders of %s", data_source, self._num, len(classes), self._path)
        else:
            self._num = len(_load_filelist(self._path, self._mmap))
            logging.info("%s: %d images listed in %s", data_source, self._num, self._path)
        self._bad: Set[int] = set()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        if self.data_source == FILELIST_SOURCE:
            state["_files"] = None  # re-read (memory-mapped) in each worker, as VISSL does
        return state

    # ---- what VISSL's task calls before each epoch's loader iterator
    def set_epoch(self, epoch: int) -> None:
        """The epoch keying the per-sample random streams (VISSL's phase index)."""
        self.epoch = int(epoch)

    # ---- listing
    def __len__(self) -> int:
        return self._num

    def num_samples(self) -> int:
        return self._num

    def image_path(self, idx: int) -> str:
        """The file of item ``idx``."""
        if self._files is None:
            self._files = _load_filelist(self._path, self._mmap)
        entry = self._files[idx]
        if self.data_source == FOLDER_SOURCE:
            return os.path.join(self._path, os.fsdecode(entry))
        path = str(entry)
        if self._remove_prefix and path.startswith(self._remove_prefix):
            path = path.replace(self._remove_prefix, self._new_prefix)
        return path

    def get_image_paths(self) -> List[str]:
        return [self.image_path(i) for i in range(self._num)]

    # ---- loading
    def __getitem__(self, idx: int):
        idx = int(idx)
        img, used = None, None
        for attempt in range(min(MAX_REPLACEMENT_ATTEMPTS, self._num)):
            j = (idx + attempt) % self._num
            if j in self._bad:
                continue
            try:
                img = load_rgb(self.image_path(j))
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001  (any decoding failure: the file is unreadable)
                self._bad.add(j)
                logging.warning(
                    "%s: unreadable image %s (%s: %s): skipped",
                    self.data_source, self.image_path(j), type(e).__name__, e,
                )
                continue
            used = j
            break
        if img is None:
            raise RuntimeError(
                f"{self.data_source}: items {idx}..{(idx + MAX_REPLACEMENT_ATTEMPTS - 1) % self._num} of "
                f"{self._path} are all unreadable (first: {self.image_path(idx)}); is the dataset corrupt?"
            )
        if used != idx:
            logging.warning(
                "%s: sample %d (%s) replaced by item %d (%s), data_valid=-1",
                self.data_source, idx, self.image_path(idx), used, self.image_path(used),
            )
        sample_seed.begin_sample(self.seed, self.epoch, idx)
        return img, used == idx


def register() -> None:
    """Add the two sources to VISSL's source map and subset-capable set."""
    import vissl.data as vissl_data

    for name in PLUGIN_SOURCES:
        vissl_data.DATASET_SOURCE_MAP[name] = DiskImageSource
        vissl_data.DATA_SOURCES_WITH_SUBSET_SUPPORT.add(name)


register()


# --------------------------------------------------------------------------
# counting replaced samples (main process)
# --------------------------------------------------------------------------
def _source_index(dataset, idx: int) -> int:
    """``GenericSSLDataset``'s index ``idx`` -> its first source's index
    (through the ``DATA_LIMIT`` subset, as ``GenericSSLDataset.__getitem__``)."""
    if dataset.data_limit >= 0 and dataset._can_random_subset_data_sources():
        if not dataset._subset_initialized:
            dataset._init_image_and_label_subset()
        return int(dataset.image_and_label_subset[idx])
    return idx


def _describe(task, phase_type: str, idx: int) -> str:
    try:
        dataset = task.datasets[phase_type]
        source = dataset.data_objs[0]
        return source.image_path(_source_index(dataset, idx))
    except Exception:  # noqa: BLE001  (a source without paths: name the index)
        return f"{phase_type} dataset index {idx}"


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


class UnreadableImagesHook(NoopHook):
    """Count and name the samples that arrived with ``data_valid = -1``."""

    def __init__(self):
        super().__init__()
        self._names: List[str] = []
        self._writer = False
        self._own_writers: list = []

    def on_phase_start(self, task) -> None:
        self._names = []

    def on_step(self, task) -> None:
        sample = getattr(task.last_batch, "sample", None) or {}
        # VISSL's construct_sample_for_model keeps both as [tensor (crops * batch,)]
        valid, data_idx = _first(sample.get("data_valid")), _first(sample.get("data_idx"))
        if valid is None or data_idx is None:
            return
        bad = torch.as_tensor(valid).reshape(-1) < 0
        if not bool(bad.any()):
            return
        phase_type = "train" if task.train else "test"
        indices = sorted(set(torch.as_tensor(data_idx).reshape(-1)[bad].tolist()))
        names = [_describe(task, phase_type, i) for i in indices]
        self._names += names
        logging.warning(
            "swav_vissl_plugin data: iteration %d: %d unreadable image(s) replaced in this batch: %s",
            task.iteration, len(names), _named(names),
        )

    def on_phase_end(self, task) -> None:
        names = self._names
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([len(names)], dtype=torch.int64, device=task.device)
            torch.distributed.all_reduce(count)
            if int(count.item()) > 0:
                gathered: List[Optional[List[str]]] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, names)
                names = [n for part in gathered for n in (part or [])]
        phase_type = "train" if task.train else "test"
        step = task.train_phase_idx
        from classy_vision.generic.distributed_util import is_primary

        if not is_primary():
            return
        if names:
            logging.warning(
                "swav_vissl_plugin data: %s phase %d: %d unreadable image(s) skipped and replaced "
                "(data_valid=-1), all ranks: %s",
                phase_type, step, len(names), _named(names),
            )
        else:
            logging.info("swav_vissl_plugin data: %s phase %d: 0 unreadable images", phase_type, step)
        if task.train:
            from swav_vissl_plugin.knn import find_tensorboard_writer

            if self._writer is False:
                self._writer = find_tensorboard_writer(task, own=self._own_writers)
            if self._writer is not None:
                self._writer.add_scalar("Data/unreadable_images", len(names), global_step=step)

    def on_end(self, task) -> None:
        for writer in self._own_writers:
            writer.close()
        self._own_writers.clear()
