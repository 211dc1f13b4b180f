"""Weighted k-nearest-neighbour monitor of the trunk's features.

The classifier (InstDisc, Wu et al. 2018; as in DINO's ``eval_knn``):
features of a labelled ``train`` split and a ``val`` split are L2-normalised;
for each val image the ``k`` train images of highest cosine similarity
``s_i`` vote for their class with weight ``exp(s_i / T)``; the prediction is
the class of largest total weight. Top-1 (top-5) is the percentage of val
images whose class is the first (among the first five voted classes) of
that ranking.
Defaults: ``k = 20``, ``T = 0.07``.

:func:`weighted_knn_votes` / :func:`knn_accuracy` are the plain functions;
:class:`KnnMonitorHook` runs them during training, every ``EVERY_N_EPOCHS``
training epochs (and after the last one), on the trunk's pooled features of
two image folders, on the primary rank, and writes the result to TensorBoard
(``kNN/top1``, ``kNN/top5``, step = epoch) and as one JSON line appended to
``<checkpoint folder>/metrics.json`` (the file and format VISSL uses for its
meters).

Config, ``config.SWAV_PLUGIN.MONITOR.KNN`` (every key optional; defaults in
:data:`KNN_DEFAULTS`):

=================  =========  =======================================================
``ENABLED``        false      run the monitor
``EVERY_N_EPOCHS`` 1          evaluate after training epochs n-1, 2n-1, ... and the last
``TRAIN_PATH``     null       image folder ``<class>/<image>`` of the labelled neighbours
``VAL_PATH``       null       image folder ``<class>/<image>`` evaluated
``K``              20         neighbours
``TEMPERATURE``    0.07       vote weight ``exp(cosine / T)``
``RESIZE``         256        shorter side resized to this (null: as stored)
``CROP``           224        centre crop (null: none)
``MEAN`` / ``STD`` ImageNet   normalisation (the multi-crop transform's defaults)
``BATCH_SIZE``     256        feature-extraction batch
``NUM_WORKERS``    4          data-loader workers
``TRAIN_LIMIT``    null       use at most this many train images (evenly spaced)
``VAL_LIMIT``      null       use at most this many val images (evenly spaced)
=================  =========  =======================================================

A view that upsamples the images (``RESIZE`` more than :data:`MAX_UPSAMPLING`
times the shorter side of the smallest of a few sampled training images) is
warned about at the start: it costs the square of the factor in compute and
measures features of blown-up images (small images: ``RESIZE: null``,
``CROP: null``, docs/small_data.md).

The other ranks do not wait for the primary rank's evaluation: they block
at their next collective (keep the evaluation well under the process-group
timeout, e.g. with ``TRAIN_LIMIT``/``VAL_LIMIT`` on ImageNet).
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from classy_vision.hooks.classy_hook import ClassyHook

__all__ = [
    "KNN_DEFAULTS",
    "weighted_knn_votes",
    "knn_accuracy",
    "list_image_folder",
    "ImageListDataset",
    "extract_trunk_features",
    "KnnMonitorHook",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# A view above 2x the images' own size is warned about (module docstring).
MAX_UPSAMPLING = 2.0

KNN_DEFAULTS: Dict[str, Any] = {
    "ENABLED": False,
    "EVERY_N_EPOCHS": 1,
    "TRAIN_PATH": None,
    "VAL_PATH": None,
    "K": 20,
    "TEMPERATURE": 0.07,
    "RESIZE": 256,
    "CROP": 224,
    "MEAN": list(IMAGENET_MEAN),
    "STD": list(IMAGENET_STD),
    "BATCH_SIZE": 256,
    "NUM_WORKERS": 4,
    "TRAIN_LIMIT": None,
    "VAL_LIMIT": None,
}


# --------------------------------------------------------------------- maths
@torch.no_grad()
def weighted_knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``(N_test, C)`` vote totals of the weighted kNN classifier.

    Features are L2-normalised here (rows); ``votes[i, c] = sum over the
    min(k, N_train) train rows j most cosine-similar to test row i with
    label c of exp(cos(i, j) / temperature)``. ``num_classes`` defaults to
    ``max(train_labels) + 1``. Test rows are processed ``chunk_size`` at a
    time (memory ``chunk_size x N_train``).
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features for {train_labels.shape[0]} labels")
    if train_features.shape[0] == 0:
        raise ValueError("no train features")
    if k < 1 or not temperature > 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    labels = train_labels.to(device=train.device, dtype=torch.long)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    k = min(int(k), train.shape[0])
    votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.t()
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        weights = (top_sim / temperature).exp()
        votes[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return votes


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) of :func:`weighted_knn_votes` on
    ``test_labels``: top-1 counts test rows whose class has the largest
    vote; top-5 those whose class has a vote (> 0) and fewer than 5 classes
    with a larger one (classes without a vote are not ranked). ``top5`` is
    ``None`` with fewer than 5 classes."""
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    votes = weighted_knn_votes(train_features, train_labels, test_features, k, temperature, num_classes)
    target = test_labels.to(votes.device, dtype=torch.long)
    n = max(int(target.numel()), 1)
    top1 = 100.0 * int((votes.argmax(dim=1) == target).sum()) / n
    top5 = None
    if num_classes >= 5:
        own = votes.gather(1, target[:, None])
        better = (votes > own).sum(dim=1)
        top5 = 100.0 * int(((own[:, 0] > 0) & (better < 5)).sum()) / n
    return {"top1": top1, "top5": top5}


# ---------------------------------------------------------------------- data
def list_image_folder(root) -> Tuple[List[Path], Optional[List[int]], List[str]]:
    """Images of ``root`` sorted by path, and their labels.

    Layout ``root/<class>/<image>`` (as VISSL's ``disk_folder``): labels are
    the index of the class folder name in the sorted class names. Images
    directly in ``root`` (no class folders) have no labels (``None``).
    Returns ``(paths, labels, class_names)``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")

    def images(d: Path) -> List[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        paths, labels = [], []
        for i, name in enumerate(classes):
            found = images(root / name)
            paths += found
            labels += [i] * len(found)
        if not paths:
            raise FileNotFoundError(f"no images under {root}/<class>/")
        return paths, labels, classes
    paths = images(root)
    if not paths:
        raise FileNotFoundError(f"no images in {root}")
    return paths, None, []


def evenly_spaced(n: int, limit: Optional[int]) -> List[int]:
    """``limit`` indices spread evenly over ``range(n)`` (all if no limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, int(limit)).round().astype(int)]


class ImageListDataset(torch.utils.data.Dataset):
    """Whole images as ``(3, H, W)`` float tensors: RGB, shorter side resized
    to ``resize`` (bilinear), centre crop ``crop``, ``x / 255`` normalised by
    ``mean``/``std``; the item is ``(tensor, index)``."""

    def __init__(self, paths: Sequence, resize: Optional[int] = None, crop: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.paths = [Path(p) for p in paths]
        self.resize = None if resize is None else int(resize)
        self.crop = None if crop is None else int(crop)
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        """The PIL image after resize and crop (RGB)."""
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        if self.resize is not None:
            w, h = img.size
            s = self.resize / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        if self.crop is not None:
            w, h = img.size
            left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
            img = img.crop((left, top, left + self.crop, top + self.crop))
        return img

    def upsampling(self, samples: int = 8) -> float:
        """How many times ``resize`` enlarges the smallest shorter side among
        ``samples`` evenly spaced images (1.0 without ``resize``)."""
        from PIL import Image

        if self.resize is None or not self.paths:
            return 1.0
        sides = []
        for i in evenly_spaced(len(self.paths), samples):
            with Image.open(self.paths[i]) as im:
                sides.append(min(im.size))
        return self.resize / min(sides)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.asarray(self.load(i), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std, i


def _trunk_output(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = trunk(x)
    while isinstance(out, (list, tuple)):
        out = out[0]
    if out.dim() == 4:
        out = F.adaptive_avg_pool2d(out, 1)
    return out.flatten(1)


@torch.no_grad()
def extract_trunk_features(trunk: torch.nn.Module, dataset, batch_size: int = 256, num_workers: int = 0,
                           device=None) -> torch.Tensor:
    """The trunk's default output (first output, average-pooled if spatial,
    flattened) for every item of ``dataset``, in eval mode (the previous
    mode is restored); float32 on the CPU."""
    if device is None:
        device = next(trunk.parameters()).device
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers)
    )
    was_training = trunk.training
    trunk.eval()
    feats = []
    try:
        for x, _ in loader:
            feats.append(_trunk_output(trunk, x.to(device, non_blocking=True)).float().cpu())
    finally:
        trunk.train(was_training)
    return torch.cat(feats)


# --------------------------------------------------------------------- config
def _plain(value):
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def section(cfg, name: str, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """``config.SWAV_PLUGIN.MONITOR.<name>`` as a plain dict over ``defaults``
    (absent keys, or an absent section, take the defaults). Unknown keys are
    an error naming the key."""
    plugin = cfg.get("SWAV_PLUGIN") if hasattr(cfg, "get") else None
    monitor = (plugin or {}).get("MONITOR") if hasattr(plugin or {}, "get") else None
    given = _plain((monitor or {}).get(name) or {}) if name else _plain(monitor or {})
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            where = f"config.SWAV_PLUGIN.MONITOR.{name + '.' if name else ''}{key}"
            raise ValueError(f"{where}: unknown key (known: {sorted(defaults)})")
        out[key] = value
    return out


def knn_settings(cfg) -> Dict[str, Any]:
    """``config.SWAV_PLUGIN.MONITOR.KNN`` over :data:`KNN_DEFAULTS`, checked."""
    s = section(cfg, "KNN", KNN_DEFAULTS)
    key = "config.SWAV_PLUGIN.MONITOR.KNN."
    if not s["ENABLED"]:
        return s
    for name in ("TRAIN_PATH", "VAL_PATH"):
        if not s[name]:
            raise ValueError(f"{key}{name} is required when {key}ENABLED is true")
    for name in ("EVERY_N_EPOCHS", "K", "BATCH_SIZE"):
        if not isinstance(s[name], int) or s[name] < 1:
            raise ValueError(f"{key}{name} must be a positive integer, got {s[name]!r}")
    if not isinstance(s["NUM_WORKERS"], int) or s["NUM_WORKERS"] < 0:
        raise ValueError(f"{key}NUM_WORKERS must be an integer >= 0, got {s['NUM_WORKERS']!r}")
    if not float(s["TEMPERATURE"]) > 0:
        raise ValueError(f"{key}TEMPERATURE must be > 0, got {s['TEMPERATURE']!r}")
    for name in ("RESIZE", "CROP", "TRAIN_LIMIT", "VAL_LIMIT"):
        if s[name] is not None and (not isinstance(s[name], int) or s[name] < 1):
            raise ValueError(f"{key}{name} must be a positive integer or null, got {s[name]!r}")
    for name in ("MEAN", "STD"):
        if len(list(s[name])) != 3:
            raise ValueError(f"{key}{name} must have 3 values, got {s[name]!r}")
    return s


# ----------------------------------------------------------------------- hook
def find_tensorboard_writer(task, cfg=None, own: Optional[list] = None):
    """The SummaryWriter of VISSL's ``SSLTensorboardHook`` among ``task.hooks``
    (its ``tb_writer``); else, when ``HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD``
    is on, a new writer in VISSL's directory (``<checkpoint folder>/tb_logs``),
    appended to ``own`` so the caller closes it; else ``None``. Call on the
    primary rank only."""
    for hook in getattr(task, "hooks", []) or []:
        writer = getattr(hook, "tb_writer", None)
        if writer is not None:
            return writer
    cfg = cfg if cfg is not None else getattr(task, "config", None)
    try:
        use = bool(cfg["HOOKS"]["TENSORBOARD_SETUP"]["USE_TENSORBOARD"])
    except (KeyError, TypeError):
        use = False
    if not use:
        return None
    from torch.utils.tensorboard import SummaryWriter
    from vissl.utils.tensorboard import get_tensorboard_dir

    writer = SummaryWriter(log_dir=get_tensorboard_dir(cfg))
    if own is not None:
        own.append(writer)
    return writer


def _is_primary() -> bool:
    from classy_vision.generic.distributed_util import is_primary

    return is_primary()


class KnnMonitorHook(ClassyHook):
    """Weighted kNN top-1/top-5 of the trunk after every ``EVERY_N_EPOCHS``
    training epochs and after the last (primary rank only); see the module
    docstring for what is computed and where it is written."""

    on_phase_start = ClassyHook._noop
    on_forward = ClassyHook._noop
    on_loss_and_meter = ClassyHook._noop
    on_backward = ClassyHook._noop
    on_update = ClassyHook._noop
    on_step = ClassyHook._noop

    def __init__(self, settings: Mapping[str, Any], cfg=None):
        super().__init__()
        self.settings = dict(settings)
        self.cfg = cfg
        self._data = None
        self._own_writers: list = []
        self._writer = False  # not looked up yet
        #: results so far: one dict per evaluation (also in metrics.json).
        self.results: List[Dict[str, Any]] = []

    def _datasets(self):
        if self._data is None:
            s = self.settings
            out = []
            for split, limit in (("TRAIN_PATH", s["TRAIN_LIMIT"]), ("VAL_PATH", s["VAL_LIMIT"])):
                paths, labels, classes = list_image_folder(s[split])
                if labels is None:
                    raise ValueError(f"config.SWAV_PLUGIN.MONITOR.KNN.{split}={s[split]} has no class folders")
                keep = evenly_spaced(len(paths), limit)
                out.append(([paths[i] for i in keep], [classes[labels[i]] for i in keep]))
            (train_paths, train_names), (val_paths, val_names) = out
            classes = sorted(set(train_names) | set(val_names))
            index = {c: i for i, c in enumerate(classes)}
            make = lambda p: ImageListDataset(p, s["RESIZE"], s["CROP"], s["MEAN"], s["STD"])  # noqa: E731
            self._data = (
                make(train_paths),
                torch.tensor([index[c] for c in train_names]),
                make(val_paths),
                torch.tensor([index[c] for c in val_names]),
                len(classes),
            )
        return self._data

    def on_start(self, task) -> None:
        # List both folders now, so that a wrong path stops the run before
        # the first epoch rather than after it.
        if _is_primary():
            train_ds, _, val_ds, _, n_classes = self._datasets()
            logging.info(
                "swav_vissl_plugin kNN monitor: %d train / %d val images, %d classes, every %d epochs",
                len(train_ds), len(val_ds), n_classes, int(self.settings["EVERY_N_EPOCHS"]),
            )
            factor = train_ds.upsampling()
            if factor > MAX_UPSAMPLING:
                logging.warning(
                    "swav_vissl_plugin kNN monitor: config.SWAV_PLUGIN.MONITOR.KNN.RESIZE=%s upsamples the "
                    "training images (shorter side %d px) %.1fx: each evaluation costs about %.0fx the compute "
                    "of the images at their own size and measures features of blown-up images; for small "
                    "images set RESIZE: null and CROP: null (docs/small_data.md)",
                    train_ds.resize, round(train_ds.resize / factor), factor, factor ** 2,
                )

    def due(self, epoch: int, num_epochs: int) -> bool:
        """Whether to evaluate after training epoch ``epoch`` (0-based) of ``num_epochs``."""
        return (epoch + 1) % int(self.settings["EVERY_N_EPOCHS"]) == 0 or epoch + 1 == num_epochs

    def evaluate(self, trunk: torch.nn.Module, device=None) -> Dict[str, Any]:
        """kNN accuracy of ``trunk``'s features on the configured folders."""
        s = self.settings
        train_ds, train_y, val_ds, val_y, n_classes = self._datasets()
        t0 = time.time()
        f_train = extract_trunk_features(trunk, train_ds, s["BATCH_SIZE"], s["NUM_WORKERS"], device)
        f_val = extract_trunk_features(trunk, val_ds, s["BATCH_SIZE"], s["NUM_WORKERS"], device)
        acc = knn_accuracy(f_train, train_y, f_val, val_y, int(s["K"]), float(s["TEMPERATURE"]), n_classes)
        return {
            "knn_top1": acc["top1"],
            "knn_top5": acc["top5"],
            "knn_k": int(s["K"]),
            "knn_temperature": float(s["TEMPERATURE"]),
            "knn_train_images": len(train_ds),
            "knn_val_images": len(val_ds),
            "knn_seconds": round(time.time() - t0, 3),
        }

    def on_phase_end(self, task) -> None:
        if not task.train or not _is_primary():
            return
        epoch = int(task.train_phase_idx)
        if not self.due(epoch, int(task.num_train_phases)):
            return
        result = self.evaluate(task.base_model.trunk, getattr(task, "device", None))
        record = {
            "iteration": int(task.iteration),
            "phase_idx": int(task.phase_idx),
            "train_phase_idx": epoch,
            **result,
        }
        self.results.append(record)
        logging.info(
            "swav_vissl_plugin kNN monitor: epoch %d, k=%d, T=%g: top-1 %.2f%%%s (%d train / %d val images, %.1fs)",
            epoch, result["knn_k"], result["knn_temperature"], result["knn_top1"],
            "" if result["knn_top5"] is None else f", top-5 {result['knn_top5']:.2f}%",
            result["knn_train_images"], result["knn_val_images"], result["knn_seconds"],
        )
        folder = getattr(task, "checkpoint_folder", None) or task.config["CHECKPOINT"]["DIR"]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "metrics.json"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is False:
            self._writer = find_tensorboard_writer(task, self.cfg, self._own_writers)
        writer = self._writer
        if writer is not None:
            writer.add_scalar("kNN/top1", result["knn_top1"], global_step=epoch)
            if result["knn_top5"] is not None:
                writer.add_scalar("kNN/top5", result["knn_top5"], global_step=epoch)
            writer.flush()

    def on_end(self, task) -> None:
        for writer in self._own_writers:
            writer.close()
        self._own_writers.clear()
        self._writer = False
