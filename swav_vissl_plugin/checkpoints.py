"""Published SwAV weights in, the plugin's VISSL checkpoints out.

The SwAV release publishes ``torch.save``'d state dicts in torchvision layout:
a ResNet-50 (or the wide w2/w4/w5 variants) trunk (``conv1.weight``,
``layer1.0.conv1.weight``, ...), keys possibly prefixed ``module.`` (saved
from DistributedDataParallel), plus the head: ``projection_head.{0,1,3}.*``
and ``prototypes.weight`` (DeepCluster-v2 / SeLa-v2:
``prototypes.prototypes{0,1,2}.weight``). ``swav_plugin_head`` uses the same
names, so the head maps one to one.

VISSL keeps the trunk under ``_feature_blocks.<torchvision key>`` and the
heads as a ModuleList (``0.<key>``), inside
``checkpoint["classy_state_dict"]["base_model"]["model"]``.

Every file is read with ``torch.load(weights_only=True)``: a file that would
need arbitrary unpickling is refused with :class:`CheckpointError` and never
executed. Files are written atomically (temporary file, then rename) and an
existing output is never overwritten unless asked.
"""

import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

HEAD_PREFIXES = ("projection_head.", "prototypes.")
TRUNK_PREFIX = "_feature_blocks."
HEAD_INDEX = "0."


class CheckpointError(ValueError):
    """A weights file that cannot be used as asked; names the file."""


def load_state(path) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, loading it needs arbitrary unpickling (it holds Python "
            "objects, not only tensors), which could run code. Re-save its state dict "
            f"with torch.save(model.state_dict(), ...) from a trusted environment. ({e})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in state.items())


def _published_state(obj: Mapping) -> Mapping[str, torch.Tensor]:
    # The release's training checkpoints wrap the weights in "state_dict".
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping) and obj[key] and all(
            isinstance(v, torch.Tensor) for v in obj[key].values()
        ):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError("not a published-layout state dict (expected tensors keyed like conv1.weight)")


def split_published(state: Mapping[str, torch.Tensor]) -> Tuple[Dict, Dict]:
    """(trunk, head) state dicts in torchvision / ``swav_plugin_head`` names.

    ``module.`` prefixes are removed; a classifier ``fc.*`` is dropped (the
    SwAV trunk ends at the pooled features).
    """
    state = strip_prefix(_published_state(state))
    trunk, head = OrderedDict(), OrderedDict()
    for k, v in state.items():
        if k.startswith(HEAD_PREFIXES):
            head[k] = v
        elif not k.startswith("fc."):
            trunk[k] = v
    if "conv1.weight" not in trunk:
        raise CheckpointError("no trunk found (no conv1.weight): not a ResNet state dict")
    return trunk, head


def published_to_vissl_model_state(state: Mapping[str, torch.Tensor]) -> Dict[str, Dict]:
    """``{"trunk": ..., "heads": ...}`` as in VISSL's ``base_model["model"]``."""
    trunk, head = split_published(state)
    return {
        "trunk": OrderedDict((TRUNK_PREFIX + k, v) for k, v in trunk.items()),
        "heads": OrderedDict((HEAD_INDEX + k, v) for k, v in head.items()),
    }


def published_to_vissl_checkpoint(state: Mapping[str, torch.Tensor]) -> dict:
    """A VISSL checkpoint (weights only) that VISSL loads with
    ``MODEL.WEIGHTS_INIT.PARAMS_FILE=<file>`` and
    ``STATE_DICT_KEY_NAME=classy_state_dict``."""
    return {
        "type": "swav_vissl_plugin.converted_weights",
        "classy_state_dict": {"base_model": {"model": published_to_vissl_model_state(state), "meta": {"trunk": {}}}},
    }


def vissl_model_state(checkpoint: Mapping) -> Dict[str, Dict]:
    """``base_model["model"]`` of a VISSL checkpoint (or the dict itself)."""
    node = checkpoint
    for key in ("classy_state_dict", "base_model", "model"):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
    if not (isinstance(node, Mapping) and "trunk" in node):
        raise CheckpointError("not a VISSL checkpoint: no classy_state_dict.base_model.model.trunk")
    return node


def vissl_to_published(checkpoint: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """The release's layout: torchvision trunk keys, then the head's keys."""
    model = vissl_model_state(checkpoint)
    out = OrderedDict()
    for k, v in model["trunk"].items():
        if not k.startswith(TRUNK_PREFIX):
            raise CheckpointError(f"trunk key {k!r} is not a VISSL ResNet key ({TRUNK_PREFIX}...)")
        out[k[len(TRUNK_PREFIX):]] = v
    for k, v in (model.get("heads") or {}).items():
        if k.startswith(HEAD_INDEX):
            out[k[len(HEAD_INDEX):]] = v
    return out


def torchvision_resnet50(width: int = 1):
    """``torchvision.models.resnet50()`` for width 1; for the release's wide
    ResNet-50s (w2, w4, w5) the same torchvision ``ResNet`` class with every
    width multiplied, the layout VISSL's ``RESNETS.WIDTH_MULTIPLIER`` builds."""
    from torch import nn
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck

    model = resnet50()
    if width == 1:
        return model
    model.inplanes = 64 * width
    model.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(64 * width)
    model.layer1 = model._make_layer(Bottleneck, 64 * width, 3)
    model.layer2 = model._make_layer(Bottleneck, 128 * width, 4, stride=2)
    model.layer3 = model._make_layer(Bottleneck, 256 * width, 6, stride=2)
    model.layer4 = model._make_layer(Bottleneck, 512 * width, 3, stride=2)
    model.fc = nn.Linear(2048 * width, 1000)
    return model


def load_trunk_into_torchvision(published: Mapping[str, torch.Tensor], width: Optional[int] = None):
    """A torchvision ResNet-50(w) with the trunk loaded ``strict=True``
    (its classifier ``fc`` is kept from initialisation: not part of SwAV)."""
    trunk, _ = split_published(published)
    if width is None:
        width = trunk["conv1.weight"].shape[0] // 64
    model = torchvision_resnet50(width)
    missing = {f"fc.{n}": p for n, p in model.fc.state_dict().items()}
    model.load_state_dict({**trunk, **missing}, strict=True)
    return model


#: Part of every temporary file name: ``.<final name>.tmp-<pid>`` (leading
#: dot, no ``.torch`` ending, so no VISSL or plugin code takes it for a checkpoint).
TEMP_MARKER = ".tmp-"
#: The link VISSL keeps to the newest checkpoint.
LINK_NAME = "checkpoint.torch"


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{TEMP_MARKER}{os.getpid()}")


def write_atomically(path: str, write: Callable[[Any], None]) -> str:
    """Write a file so that ``path`` is, at every instant, either its previous
    content or the complete new one: ``write(file object)`` fills a temporary
    file in the same folder, which is flushed and fsynced, renamed over
    ``path`` (``os.replace``, atomic on POSIX), and the folder is fsynced so
    the rename itself is durable. A failed or interrupted write leaves
    ``path`` untouched (the temporary file is removed on failure; after a
    kill it stays, and the next run's :meth:`PluginCheckpointHook.on_start`
    removes it)."""
    path = os.path.abspath(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(os.path.dirname(path))
    return path


def point_link(folder: str, target_name: str, link_name: str = LINK_NAME) -> str:
    """Make ``folder/link_name`` a symlink to ``target_name`` (relative, so
    the run folder can be moved), replacing any previous link atomically."""
    link = os.path.join(os.path.abspath(folder), link_name)
    tmp = _temp_path(link)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    _fsync_folder(os.path.dirname(link))
    return link


def save_atomic(obj, path, overwrite: bool = False) -> Path:
    """``torch.save`` through :func:`write_atomically`; refuses to replace an
    existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: exists; refusing to overwrite it (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), lambda f: torch.save(obj, f))
    return path
