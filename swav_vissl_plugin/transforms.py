"""SwAV multi-crop augmentation and its batch collator, as VISSL plugins.

What is computed
----------------
:class:`SwavPluginMultiCrop` (registered in ClassyVision's transform registry
as ``"SwavPluginMultiCrop"``) turns one PIL image into ``sum(nmb_crops)``
normalised ``float32`` tensors of shape ``(3, size, size)``: first the
``nmb_crops[0]`` crops of ``size_crops[0]``, then those of ``size_crops[1]``,
and so on.  Each crop independently goes through the per-crop chain of the SwAV
release, i.e. the recipe line (``docs/recipe.md``, row
"augmentation per crop")::

    RandomResizedCrop(size, scale=(min,max)), RandomHorizontalFlip(0.5),
    RandomApply(ColorJitter(0.8,0.8,0.8,0.2), p=0.8), RandomGrayscale(0.2),
    PIL GaussianBlur p=0.5 radius U(0.1,2.0), ToTensor,
    Normalize(mean=[0.485,0.456,0.406], std=[0.228,0.224,0.225])

The augmentation *distribution* is that of the torchvision chain above (same
crop-box sampling with 10 attempts and centre-crop fallback, same colour
jitter factor ranges and random order, same blur radius range); the values
are torchvision's for the same random parameters, exactly for the flip,
colour jitter and grayscale, within 1 level for the resize and within 3
levels for the blur (tests/test_transforms.py). The implementation is
faster:

* all random numbers of all crops of one image come from a single
  ``torch.rand`` call: on the per-sample stream the data source opened
  (``sample_seed.py``: keyed by seed, epoch and dataset index, so a resumed
  run draws the same crops), else on torch's global RNG; Python's ``random``
  is never used;
* the crops read the image's own pixel memory (Pillow's RGBX layout,
  exported without a copy through the Arrow C data interface; a copy where
  Pillow cannot export it); crop-then-resize is torch's uint8
  ``interpolate(bilinear, antialias=True)`` on the box (channels-last SIMD
  kernels): the filter of PIL's ``resize(BILINEAR)`` that torchvision's
  ``RandomResizedCrop`` applies, with values within 1 of PIL's (fixed-point
  rounding);
* every crop then lives in one float32 buffer of 8-bit levels per crop size,
  from the resize to the normalised output (no PIL images, no 8-bit round
  trips): brightness, contrast, saturation and grayscale are PIL's blends
  and ``convert("L")`` written as the same float32 operations; the hue shift
  is PIL's HSV round trip in closed form (PIL's hue byte, exact rational
  arithmetic for the rest, the hue ramp as one absolute value per channel,
  equal to torchvision's ``adjust_hue`` for every colour and shift). They
  run as compiled loops, one call per crop and one pass per adjustment
  (:mod:`swav_vissl_plugin.colour_kernel`, Numba), else as the NumPy
  operations of this module, which compute the same levels
  (``SWAV_PLUGIN_COLOUR_KERNEL=numpy`` selects them);
* the Gaussian blur is PIL's six box passes composed into one linear
  operator per axis (four coefficients times a cached integer basis),
  applied as banded products (one batched product per pass, the render
  buffers' zero margins read at the crops' ends) for sizes that are
  multiples of 32, else as dense ones, rounded once; grey crops are
  blurred on one channel;
* ToTensor + Normalize is one fused ``x * 1/(255 std) - mean/std`` in place
  over all crops of the same size.

Importing this module also appends ``"SwavPluginMultiCrop"`` to VISSL's
``_TRANSFORMS_WITH_COPIES`` (so ``SSLTransformsWrapper`` flattens the crop
list and replicates ``label``/``data_valid``/``data_idx`` per crop) and
registers the collator ``"swav_plugin_multicrop_collator"``, whose output has
exactly the structure, shapes and dtypes of VISSL's ``multicrop_collator``.
"""

import ctypes
import functools
import math
import numbers
import os
import struct
import threading
import time
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from classy_vision.dataset.transforms import register_transform
from classy_vision.dataset.transforms.classy_transform import ClassyTransform
from PIL import Image
from torch.utils.data import default_collate
from vissl.data.collators import register_collator
from vissl.data.collators.collator_helper import MultiDimensionalTensor
from vissl.data.ssl_transforms import ssl_transforms_wrapper as _vissl_wrapper

from swav_vissl_plugin import sample_seed

__all__ = [
    "TRANSFORM_NAME",
    "COLLATOR_NAME",
    "JitterParams",
    "CropParams",
    "SwavPluginMultiCrop",
    "swav_plugin_multicrop_collator",
    "to_rgb",
    "COLOUR_KERNEL_ENV",
    "colour_kernel_backend",
    "warm_colour_kernel",
]

TRANSFORM_NAME = "SwavPluginMultiCrop"
COLLATOR_NAME = "swav_plugin_multicrop_collator"

_CONFIG_HINT = (
    "(set it in the config.DATA.<TRAIN|TEST>.TRANSFORMS entry with "
    f"name: {TRANSFORM_NAME})"
)

# Recipe defaults (SwAV release; docs/recipe.md "augmentation per crop").
_DEFAULTS: Dict[str, Any] = {
    "color_jitter_strength": 1.0,
    "color_jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_p": 0.5,
    "blur_radius": [0.1, 2.0],
    "blur_radius_fraction": None,
    "flip_p": 0.5,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.228, 0.224, 0.225],
    "ratio": [3.0 / 4.0, 4.0 / 3.0],
    "normalize": True,
}
_REQUIRED = ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops")
# Keys VISSL's SSLTransformsWrapper may leave in the config it forwards.
_WRAPPER_KEYS = ("indices",)

# Layout of the per-crop uniform draws (one row of torch.rand per crop).
_N_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes
_C_AREA = slice(0, _N_ATTEMPTS)
_C_LOGR = slice(_N_ATTEMPTS, 2 * _N_ATTEMPTS)
_C_TOP = 2 * _N_ATTEMPTS
_C_LEFT = _C_TOP + 1
_C_FLIP = _C_TOP + 2
_C_JIT = _C_TOP + 3
_C_FACTORS = slice(_C_TOP + 4, _C_TOP + 8)  # brightness, contrast, saturation, hue
_C_ORDER = slice(_C_TOP + 8, _C_TOP + 12)  # argsort -> random permutation of 4
_C_GRAY = _C_TOP + 12
_C_BLUR = _C_TOP + 13
_C_RADIUS = _C_TOP + 14
_N_DRAWS = _C_TOP + 15


class JitterParams(NamedTuple):
    """Colour-jitter draw of one crop (torchvision ``ColorJitter`` semantics).

    ``order`` is a permutation of (0 brightness, 1 contrast, 2 saturation,
    3 hue): the order in which the four adjustments are applied.
    """

    order: Tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float


class CropParams(NamedTuple):
    """Every random choice made for one crop; ``apply_params`` replays it."""

    size: int
    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: Optional[JitterParams]  # None: colour jitter not applied
    grayscale: bool
    blur_radius: Optional[float]  # None: no blur


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB PIL image.

    16-bit modes (``I;16``, ``I;16B``, ...) are rescaled to 8 bits
    (``round(v / 257)``) rather than clipped at 255, which is what PIL's own
    ``convert("RGB")`` would do; every other mode (L, P, RGBA, CMYK, 1, LA,
    I, F, ...) uses PIL's conversion (alpha is dropped, as in VISSL's loaders).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(
            f"{TRANSFORM_NAME} expects a PIL image, got {type(img).__name__}"
        )
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint32)
        arr = ((arr * 2 + 257) // 514).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:  # no direct route to RGB (e.g. premultiplied "La")
        for via in ("LA", "RGBA"):
            try:
                return img.convert(via).convert("RGB")
            except ValueError:
                pass
        raise ValueError(f"{TRANSFORM_NAME}: cannot convert mode {mode} to RGB")


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgbx_view(img: Image.Image) -> Optional[torch.Tensor]:
    """The pixel memory of an RGB PIL image as an ``(H, W, 4)`` uint8 tensor
    (R, G, B, padding), without a copy, or None where Pillow cannot export it.

    Pillow stores an RGB image as 4 bytes per pixel and exports that memory
    through the Arrow C data interface (``Image.__arrow_c_array__``, Pillow
    >= 11.2; a fixed-size list of 4 uint8 per pixel, one buffer when the
    image is in one memory block). The exported array keeps the image memory
    alive until its capsule is released, so the tensor holds the capsule.
    ``np.asarray(img)`` instead copies the image through ``tobytes`` (0.2-0.4
    ms for 500x375, more than the crops' copies it would save)."""
    export = getattr(img, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        schema_capsule, array_capsule = export()
        schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
        array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
        W, H = img.size
        if (
            schema.format != b"+w:4"
            or schema.n_children != 1
            or schema.children[0].contents.format != b"C"
            or array.length != W * H
            or array.offset != 0
            or array.n_children != 1
        ):
            return None
        child = array.children[0].contents
        if child.n_buffers != 2 or child.offset != 0 or not child.buffers[1]:
            return None
        memory = (ctypes.c_uint8 * (4 * W * H)).from_address(child.buffers[1])
    except (ValueError, TypeError, AttributeError, OSError):
        return None  # e.g. an image spread over several memory blocks
    view = torch.frombuffer(memory, dtype=torch.uint8).view(H, W, 4)
    view._swav_arrow_export = (schema_capsule, array_capsule)  # keeps the memory alive
    return view


def _as_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as an ``(H, W, C)`` uint8 tensor, ``C`` = 4 (the
    image's own RGBX memory, no copy: :func:`_rgbx_view`) or 3 (one copy);
    read-only use: the crops are copied out of it, channels 0-2."""
    view = _rgbx_view(img)
    if view is not None:
        return view
    arr = np.asarray(img)
    if not arr.flags.writeable:
        with warnings.catch_warnings():
            # torch warns that it cannot protect a read-only array from writes
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _resized_crop_into(source: np.ndarray, p: CropParams, out: np.ndarray) -> None:
    """Crop ``p``'s box of ``source`` (``(H, W, C)`` uint8, RGB in channels
    0-2), resize it to ``p.size`` square, bilinear with antialiasing, flip it
    if ``p.flip``, and write it planar into ``out`` (``(3, size, size)``, any
    dtype).

    torchvision's ``RandomResizedCrop`` on a PIL image is PIL's crop then
    ``resize(BILINEAR)`` (a triangle filter widened by the downscaling factor,
    edge pixels replicated at the box border); torch's uint8
    ``interpolate(mode="bilinear", antialias=True)`` implements the same
    filter (ported from Pillow) with SIMD kernels for channels-last images of
    3 or 4 channels (it works on 4 internally, so the RGBX source costs
    nothing extra), about twice as fast; its values differ from PIL's by at
    most 1 (fixed-point rounding; tests/test_transforms.py checks it). The
    box is first copied by NumPy (whole rows at a time; torch would copy a
    strided box byte by byte) and the resize is called without
    ``F.interpolate``'s Python layer; the flip is a reversed view read by the
    one copy that makes the crop planar."""
    h, w, C = p.height, p.width, source.shape[2]
    box = source[p.top : p.top + h, p.left : p.left + w]
    if h == p.size and w == p.size:
        chw = box.transpose(2, 0, 1)[:3]
    else:
        y, chw = _workspace(p.size).resized(C)
        n = h * w * C
        buf, buf_np = _box_buffer(n)
        np.copyto(buf_np[:n].reshape(h, w, C), box)
        _upsample_aa(buf.as_strided((1, C, h, w), (n, 1, w * C, C)), [p.size, p.size], False, None, None, out=y)
    np.copyto(out, chw[:, :, ::-1] if p.flip else chw, casting="unsafe")


# torch's antialiased bilinear resize (what F.interpolate(mode="bilinear",
# antialias=True) calls), with an output argument
_upsample_aa = torch._C._nn._upsample_bilinear2d_aa


# ---------------------------------------------------------------------------
# Colour operations on float32 planar crops.
#
# A crop is a (3, P) float32 array of 8-bit levels (integers 0..255), changed
# in place. Each operation computes, level for level, what torchvision's PIL
# functions compute on the 8-bit image (tests/test_transforms.py compares
# them on every hue shift and on random factors):
# * PIL's Image.blend(a, b, alpha) computes per byte, in float32,
#   ``t = a + alpha * (b - a)`` (two roundings) and stores 0 if t <= 0, 255 if
#   t >= 255, else trunc(t): brightness (a = 0), contrast (a = the rounded
#   mean grey level, ImageEnhance.Contrast) and saturation (a = the pixel's
#   grey level, ImageEnhance.Color) are those float32 operations, without the
#   round trips through 8-bit images.
# * PIL's RGB -> L is ``(19595 r + 38470 g + 7471 b + 0x8000) >> 16``: with
#   the weights divided by 2**16 (exact), every product and partial sum is a
#   multiple of 2**-16 below 256, so the float32 matrix product is exact in
#   any summation order and ``floor(sum + 1/2)`` is PIL's level.
# Working on float32 levels in place keeps every crop in one buffer from the
# resize to the normalised output (no PIL images, no 8-bit copies).
# ---------------------------------------------------------------------------
_F32 = np.float32
_LUMA_W = np.array([[19595.0, 38470.0, 7471.0]], dtype=np.float32) / _F32(65536.0)
_HUE = 3  # index of the hue adjustment in JitterParams.order


class _Workspace:
    """Work arrays for crops of up to ``size x size`` pixels.

    Kept per thread and reused from image to image (:func:`_workspace`), so
    that the colour operations, the resize and the blur allocate no
    temporaries (freshly allocated memory costs a page fault per 4 KiB on
    first touch)."""

    def __init__(self, size: int):
        P = size * size
        self.size = size
        self.P = P
        self.v = np.empty(P, np.float32)
        self.c = np.empty(P, np.float32)
        self.t = np.empty((1, P), np.float32)
        self.idx = torch.empty(P, dtype=torch.int32)
        self.h8 = torch.empty(P, dtype=torch.uint8)
        self.L = np.empty((1, P), np.float32)
        self._blur_tmp = torch.empty(0)
        self._resized: Dict[int, Tuple[torch.Tensor, np.ndarray]] = {}
        self._hue_views: Dict[int, tuple] = {}

    def resized(self, channels: int) -> Tuple[torch.Tensor, np.ndarray]:
        """The resize output, a ``(1, channels, size, size)`` channels-last
        uint8 tensor, and its first 3 channels as a ``(3, size, size)``
        NumPy view."""
        if channels not in self._resized:
            S = self.size
            y = torch.empty((1, S, S, channels), dtype=torch.uint8).permute(0, 3, 1, 2)
            self._resized[channels] = (y, y[0].numpy()[:3])
        return self._resized[channels]

    def blur_tmp(self, crops: int) -> torch.Tensor:
        """A float32 work buffer for the blur of ``crops`` crops, with
        :data:`_BLUR_MARGIN` rows of zeros before and after it (the blur's
        windows read them, with weight zero)."""
        n = crops * 3 * self.P
        if self._blur_tmp.numel() < n:
            self._blur_tmp = _with_margins(n, _BLUR_MARGIN * self.size)
        return self._blur_tmp

    def hue_views(self, P: int) -> tuple:
        """NumPy and torch views of the hue's work arrays for ``P`` pixels,
        made once (a torch view of a NumPy array or the reverse costs about
        as much as a pass over a 96x96 crop). The float hue shares the
        memory of the gather indices, the saturation denominator that of the
        index computation: a smaller working set (the hue of a 224 crop
        does not fit in a 1 MiB L2 cache)."""
        if P not in self._hue_views:
            idx, h8 = self.idx[:P], self.h8[:P]
            idx_n = idx.numpy()
            h = idx_n.view(np.float32)
            self._hue_views[P] = (
                self.v[:P], self.c[:P], h, torch.from_numpy(h), self.t[:, :P], self.t[0, :P],
                idx, idx_n, h8, h8.numpy(),
            )
        return self._hue_views[P]


_TLS = threading.local()


def _workspace(size: int) -> _Workspace:
    cache = getattr(_TLS, "workspaces", None)
    if cache is None:
        cache = _TLS.workspaces = {}
    if size not in cache:
        cache[size] = _Workspace(size)
    return cache[size]


def _box_buffer(numel: int) -> Tuple[torch.Tensor, np.ndarray]:
    """A per-thread uint8 buffer of at least ``numel`` bytes (crop boxes), as
    a torch tensor and a NumPy array on the same memory."""
    buf = getattr(_TLS, "box", None)
    if buf is None or buf[0].numel() < numel:
        t = torch.empty(numel, dtype=torch.uint8)
        buf = _TLS.box = (t, t.numpy())
    return buf


def _with_margins(numel: int, margin: int) -> torch.Tensor:
    """A float32 tensor of ``numel`` elements preceded and followed, in its
    storage, by ``margin`` zeros (see :func:`_blur_`)."""
    flat = torch.empty(numel + 2 * margin)
    flat[:margin].zero_()
    flat[margin + numel :].zero_()
    return flat[margin : margin + numel]


def _luma(X: np.ndarray, ws: _Workspace) -> np.ndarray:
    """PIL's ``convert("L")`` of the planar crop ``X``: ``(1, P)`` levels."""
    L = np.matmul(_LUMA_W, X, out=ws.L[:, : X.shape[1]])
    L += _HALF
    return np.floor(L, out=L)


def _clip_trunc(X: np.ndarray, factor: float, lower: bool = True) -> None:
    # With alpha = factor <= 1 the blend a + alpha * (b - a) lies between a
    # and b, both in [0, 255], also in float32 (rounding is monotonic), so
    # PIL's clipping is a no-op and only the truncation remains (``lower``:
    # whether the blend can be negative); torch's in-place kernels on the
    # same memory are 1.5-2.5x faster than NumPy's.
    t = torch.from_numpy(X)
    if factor > 1.0:
        if lower:
            t.clamp_(0.0, 255.0)
        else:
            t.clamp_max_(255.0)
    t.trunc_()


def _brightness_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Brightness: blend with black, 0 + f * (x - 0) == f * x,
    # never negative (f >= 0).
    X *= _F32(factor)
    _clip_trunc(X, factor, lower=False)


def _contrast_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5),
    # the mean as ImageStat computes it (exact integer sum / pixel count).
    L = _luma(X, ws)
    # integer levels: a float32 sum is exact below 2**24 (torch's is fastest)
    total = float(torch.from_numpy(L).sum()) if 255 * L.size < (1 << 24) else float(L.sum(dtype=np.float64))
    m = _F32(int(total / L.size + 0.5))
    X -= m
    X *= _F32(factor)
    X += m
    _clip_trunc(X, factor)


def _saturation_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Color: blend with the pixel's own grey level.
    L = _luma(X, ws)
    X -= L
    X *= _F32(factor)
    X += L
    _clip_trunc(X, factor)


def _grayscale_(X: np.ndarray, ws: _Workspace) -> None:
    # RandomGrayscale: PIL's convert("L") broadcast to the 3 channels.
    X[:] = _luma(X, ws)


def _build_hue_table() -> np.ndarray:
    """PIL's hue byte (``convert("HSV")``, Pillow's Convert.c, float
    arithmetic) as a function of ``(r - g, g - b)``, filled by PIL itself
    from one pixel per pair: index ``(r - g) * 511 + (g - b) + 130560``."""
    d1, d2 = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    r, g, b = d1, np.zeros_like(d1), -d2
    low = np.minimum(np.minimum(r, g), b)
    r, g, b = r - low, g - low, b - low
    fits = np.maximum(np.maximum(r, g), b) <= 255
    pix = np.stack([np.where(fits, c, 0) for c in (r, g, b)], -1).astype(np.uint8)
    return np.asarray(Image.fromarray(pix).convert("HSV"))[..., 0].ravel().copy()


_HUE_OF_DIFFS = _build_hue_table()  # uint8
_HUE_OF_DIFFS_T = torch.from_numpy(_HUE_OF_DIFFS)
# (r - g) * 511 + (g - b) + 130560 == 511 r - 510 g - b + 130560: one exact
# float32 matrix product (all values are integers below 2**24)
_HUE_INDEX_W = np.array([[511.0, -510.0, -1.0]], dtype=np.float32)
_HUE_INDEX_OFFSET = _F32(255.0 * 511.0 + 255.0)
# NumPy scalars made once (constructing one costs as much as a small pass)
_HALF, _SIX, _F255, _F510, _TINY = _F32(0.5), _F32(6.0), _F32(255.0), _F32(510.0), _F32(1e-30)
_INV_65025 = _F32(1.0 / 65025.0)
_U8 = [np.uint8(k) for k in range(256)]
# Per channel (R, G, B), the centre c_n of the one-|.| form of the hue ramp
# in 6 h' (see _hue_).
_HUE_CENTRE = np.array([[765.0], [510.0], [1020.0]], dtype=np.float32)


def _hue_(X: np.ndarray, shift: int, ws: _Workspace) -> None:
    """torchvision's PIL ``adjust_hue``: the HSV round trip with the hue byte
    shifted by ``shift`` modulo 256, level for level.

    RGB -> HSV: ``v = max``, the saturation byte ``s = floor(255 (max -
    min) / max)`` (exact rational arithmetic equals PIL's float code for
    every (chroma, max) pair) and the hue byte ``h`` from PIL's own table
    (:func:`_build_hue_table`; its float rounding differs from exact
    arithmetic on 0.2 % of the colours, so it is looked up, not computed).
    HSV -> RGB: with ``h' = (h + shift) mod 256`` (a uint8 addition), each
    channel ``n`` is ``v - round(v s X_n / 65025)``, ``X_n`` the channel's
    position on PIL's piecewise-linear hue ramp in 1/255 units (255: PIL's
    ``p``, 0: ``v``, else its ``q`` or ``t``): ``X_n = clip(510 - d_n, 0,
    255)``, ``d_n`` the distance on the circle of 1530 between ``6 h'`` and
    the channel's peak (R 765, G 1275, B 255). Over ``0 <= 6 h' <= 1530``
    one absolute value gives it: ``X_R = clip(510 - |6 h' - 765|, 0, 255)``
    (centred on the peak) and ``X_G, X_B = clip(|6 h' - t| - 255, 0, 255)``
    with ``t`` = 510, 1020 (centred on the trough, where ``X = 0``; exact up
    to 1020 from it), computed as ``Y = clip(|6 h' - c_n|, 255, 510)`` then
    ``510 - Y`` or ``Y - 255``. Evaluated as ``rint(X_n * (v s / 65025))``
    in float32 this rounding equals PIL's for all 2**24 (v, s, X) (checked
    exhaustively when written; the tests compare whole images for every
    shift)."""
    r, g, b = X
    v, c, h, h_t, t, t0, idx, idx_n, h8, h8_n = ws.hue_views(X.shape[1])
    np.maximum(r, g, out=v)
    np.maximum(v, b, out=v)
    np.minimum(r, g, out=c)
    np.minimum(c, b, out=c)
    np.subtract(v, c, out=c)  # chroma
    # PIL's hue byte by table look-up (torch's int32 gather: faster than np.take)
    np.matmul(_HUE_INDEX_W, X, out=t)
    np.add(t0, _HUE_INDEX_OFFSET, out=idx_n, casting="unsafe")
    torch.index_select(_HUE_OF_DIFFS_T, 0, idx, out=h8)
    np.add(h8_n, _U8[shift], out=h8_n)  # uint8: modulo 256
    h_t.copy_(h8)  # over the indices, no longer needed
    h *= _SIX
    w = np.multiply(c, _F255, out=c)
    den = np.add(v, _TINY, out=t0)  # v = 0 (then c = 0) gives 0
    w /= den
    np.floor(w, out=w)  # saturation byte s
    w *= v  # v s, exact (< 2**16)
    w *= _INV_65025
    K = np.subtract(h, _HUE_CENTRE, out=X)  # the input is no longer needed
    np.abs(K, out=K)
    torch.from_numpy(K).clamp_(255.0, 510.0)
    np.subtract(_F510, K[0], out=K[0])
    np.subtract(K[1:], _F255, out=K[1:])  # X_n
    K *= w
    np.rint(K, out=K)  # never a tie: the exact value is never k + 1/2
    np.subtract(v, K, out=X)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _hue_)
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")

COLOUR_KERNEL_ENV = "SWAV_PLUGIN_COLOUR_KERNEL"
_COLOUR_KERNEL: list = []  # [the compiled function or None, why None]
_COLOUR_KERNEL_LOCK = threading.Lock()


def _colour_kernel_choice() -> str:
    """``SWAV_PLUGIN_COLOUR_KERNEL`` checked: "numba", "numpy" or "" (unset)."""
    choice = os.environ.get(COLOUR_KERNEL_ENV, "").strip().lower()
    if choice not in ("", "numba", "numpy"):
        raise ValueError(
            f"environment variable {COLOUR_KERNEL_ENV}={os.environ[COLOUR_KERNEL_ENV]!r}: "
            "expected 'numba', 'numpy' or unset"
        )
    return choice


def _colour_kernel():
    """The compiled colour kernel (``colour_kernel.colour_crop``), or None
    for the NumPy operations: the environment's ``SWAV_PLUGIN_COLOUR_KERNEL``
    (``numba``: required, ``numpy``: off, unset: Numba if importable),
    decided once per process (:func:`colour_kernel_backend` says which)."""
    if not _COLOUR_KERNEL:
        with _COLOUR_KERNEL_LOCK:
            if not _COLOUR_KERNEL:
                choice = _colour_kernel_choice()
                if choice == "numpy":
                    _COLOUR_KERNEL[:] = [None, f"{COLOUR_KERNEL_ENV}=numpy"]
                else:
                    try:
                        from swav_vissl_plugin.colour_kernel import colour_crop
                    except ImportError as e:
                        if choice == "numba":
                            raise ImportError(f"{COLOUR_KERNEL_ENV}=numba, but Numba cannot be imported: {e}") from e
                        colour_crop, why = None, f"Numba cannot be imported ({e})"
                        warnings.warn(f"{TRANSFORM_NAME}: {why}; the colour jitter runs as NumPy operations (slower)")
                    else:
                        why = ""
                    _COLOUR_KERNEL[:] = [colour_crop, why]
    return _COLOUR_KERNEL[0]


def warm_colour_kernel() -> None:
    """Decide the colour backend of this process and, for the compiled
    kernel, compile it (or load it from Numba's cache) now, with one call on
    a 1-pixel crop: processes forked later inherit it ready."""
    kernel = _colour_kernel()
    if kernel is not None:
        kernel(np.zeros((3, 1), np.float32), (0, 1, 2, 3), (1.0, 1.0, 1.0), 0, True)


def colour_kernel_backend() -> str:
    """``"numba"`` or ``"numpy (<why>)"``: how this process computes the
    colour jitter and grayscale (the levels are the same)."""
    _colour_kernel()
    return "numba" if _COLOUR_KERNEL[0] is not None else f"numpy ({_COLOUR_KERNEL[1]})"


class _StageClock:
    """Adds process CPU time per named step to ``totals`` (no-op if None)."""

    def __init__(self, totals: Optional[Dict[str, float]]):
        self.totals = totals
        self.t0 = 0.0

    def start(self) -> None:
        if self.totals is not None:
            self.t0 = time.process_time()

    def stop(self, name: str) -> None:
        if self.totals is not None:
            self.totals[name] = self.totals.get(name, 0.0) + time.process_time() - self.t0


def _hue_shift_byte(hue: float) -> int:
    # torchvision: np.uint8(hue * 255) added to the uint8 hue channel.
    return int(hue * 255) % 256


# ---------------------------------------------------------------------------
# Gaussian blur.
#
# PIL's GaussianBlur(radius) (Pillow's BoxBlur.c) runs 3 horizontal then 3
# vertical "extended box" passes: out[i] = round((ww * sum_{|d|<=r} x[i+d] +
# fw * (x[i-r-1] + x[i+r+1])) / 2**24), edge pixels replicated, the box radius
# r + a and the integer weights ww, fw derived from the radius in float32
# (:func:`_pil_box_weights`). Here the six passes are applied as one linear
# operator per axis (the product of the three pass matrices, replicated edges
# included), as a matrix product, rounding once at the end instead of after
# every pass: values within 3 levels of PIL's (mean absolute difference 0.1
# to 0.5 level on photographs, no bias except at radii whose box weights make
# PIL's per-pass rounding hit exact halves; tests/test_transforms.py).
#
# One pass is K = a A + b B (a = ww / 2**24, b = fw / 2**24; A sums the 2r+1
# samples around each output, B the two at distance r + 1, indices clamped),
# so the three passes are the cubic
#     K^3 = a^3 A^3 + a^2 b (A^2 B + A B A + B A^2)
#           + a b^2 (A B^2 + B A B + B^2 A) + b^3 B^3,
# whose four integer matrices depend only on (S, r) and are computed once
# (r is 0 or 1 for the recipe's radii): a crop's operator is four
# coefficients times a cached basis, never a product of matrices.
# ---------------------------------------------------------------------------
_BLUR_BLOCK = 32  # output rows / columns per block of the banded products


_F32_STRUCT = struct.Struct("f")


def _f32(x: float, _pack=_F32_STRUCT.pack, _unpack=_F32_STRUCT.unpack) -> float:
    # the float32 nearest to x (a double operation on float32 operands,
    # rounded to float32, is the float32 operation: 53 >= 2 * 24 + 2 bits)
    return _unpack(_pack(x))[0]


def _pil_box_weights(radius: float) -> Tuple[int, int, int]:
    """``(r, ww, fw)`` of one box pass of PIL's ``GaussianBlur(radius)``:
    Pillow's ``_gaussian_blur_radius`` (3 passes) and
    ``ImagingHorizontalBoxBlur``, with their float32 (and double)
    arithmetic, each float32 operation rounded as C rounds it."""
    rad = _f32(radius)
    sigma2 = _f32(_f32(rad * rad) / 3.0)
    L = _f32(math.sqrt(12.0 * sigma2 + 1.0))
    l = _f32(math.floor((L - 1.0) / 2.0))
    l1 = l + 1.0  # small integers: exact
    a = _f32(_f32(2.0 * l + 1.0) * _f32(_f32(l * l1) - _f32(3.0 * sigma2)))
    a = _f32(a / _f32(6.0 * _f32(sigma2 - _f32(l1 * l1))))
    box = _f32(l + a)
    r = int(box)
    ww = int(_f32(float(1 << 24) / _f32(_f32(box * 2.0) + 1.0)))
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    return r, ww, fw


def _box_shift_sums(S: int, r: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(A, B)``: ``(S, S)`` matrices summing, for each output sample, the
    input samples at offsets ``|d| <= r`` (``A``) and ``d = +-(r + 1)``
    (``B``), indices clamped to the line (replicated edges)."""
    A = np.zeros((S, S))
    B = np.zeros((S, S))
    rows = np.arange(S)
    for d in range(-r - 1, r + 2):
        np.add.at(B if abs(d) == r + 1 else A, (rows, np.clip(rows + d, 0, S - 1)), 1.0)
    return A, B


@functools.lru_cache(maxsize=None)
def _blur_basis(S: int, r: int) -> np.ndarray:
    """The four ``(S, S)`` integer matrices of the cubic ``(a A + b B)^3``
    (section comment), float64, as rows of a ``(4, S * S)`` array."""
    A, B = _box_shift_sums(S, r)
    AA, AB, BA, BB = A @ A, A @ B, B @ A, B @ B
    basis = np.stack([AA @ A, AA @ B + AB @ A + BA @ A, AB @ B + BA @ B + BB @ A, BB @ B])
    return basis.reshape(4, S * S)


def _blur_coefficients(box: Tuple[int, int, int]) -> np.ndarray:
    """``a^3, a^2 b, a b^2, b^3`` of a box pass ``(r, ww, fw)``, ``a = ww /
    2**24``, ``b = fw / 2**24`` (float64)."""
    a, b = box[1] / 16777216.0, box[2] / 16777216.0
    return np.array([a * a * a, a * a * b, a * b * b, b * b * b])


def _nonzeros(basis: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The columns of a ``(4, n)`` basis with a non-zero entry: their
    indices and the ``(4, K)`` values (the operators are bands: a crop's
    operator is computed and read on its band only)."""
    nz = np.flatnonzero(np.any(basis != 0, axis=0))
    return nz, np.ascontiguousarray(basis[:, nz])


@functools.lru_cache(maxsize=None)
def _sparse_basis(S: int, r: int) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`_nonzeros` of :func:`_blur_basis` (a band of half-width
    ``3 (r + 1)``)."""
    return _nonzeros(_blur_basis(S, r))


def _blur_matrices_into(P: np.ndarray, S: int, boxes: Sequence[Tuple[int, int, int]]) -> None:
    """Write the operator of each box pass ``boxes[i]`` (see
    :func:`_blur_matrix`) into the zeroed row ``P[i]`` (``S * S`` float32)."""
    for i, box in enumerate(boxes):
        nz, vals = _sparse_basis(S, box[0])
        P[i, nz] = np.dot(_blur_coefficients(box), vals)


def _blur_matrix(S: int, box: Tuple[int, int, int]) -> np.ndarray:
    """PIL's three box passes (``box`` = ``(r, ww, fw)``, from
    :func:`_pil_box_weights`) along one axis of ``S`` samples, composed:
    ``(S, S)`` float32, row = output sample."""
    P = np.zeros((1, S * S), np.float32)
    _blur_matrices_into(P, S, [box])
    return P.reshape(S, S)


@functools.lru_cache(maxsize=None)
def _window_basis(S: int, r: int, blk: int, h: int) -> Tuple[np.ndarray, np.ndarray]:
    """The basis of :func:`_blur_basis` cut into ``nb = S / blk`` blocks of
    ``blk`` outputs whose windows all start ``h`` samples before the block
    (``h >= 3 (r + 1)``, the band's half-width; ``W = blk + 2 h``), also at
    the line's ends, where the samples outside the line get weight zero:
    ``(4, nb * blk * W)`` as its :func:`_nonzeros`. With the same start for
    every block, the windows of all blocks, rows, channels and crops are one
    strided view, so that a pass is one batched product."""
    W, nb = blk + 2 * h, S // blk
    full = _blur_basis(S, r).reshape(4, S, S)
    rows = np.arange(S).reshape(nb, blk, 1)
    cols = (np.arange(nb) * blk - h).reshape(nb, 1, 1) + np.arange(W).reshape(1, 1, W)
    inside = (cols >= 0) & (cols < S)
    blocks = np.where(inside, full[:, rows, np.clip(cols, 0, S - 1)], 0.0)  # (4, nb, blk, W)
    # every non-zero of the operator lies in its block's window
    assert np.array_equal(blocks.sum(3), full.sum(2).reshape(4, nb, blk))
    return _nonzeros(blocks.reshape(4, -1))


# Zeros kept before and after the render buffers and the blur's work buffer,
# in rows of the crop: the windows of the blocks at the ends of a line or of
# a channel reach h = 3 (r + 1) samples (rows, for the vertical pass) outside
# it, and the banded products take bands up to half a block (h <= 16; the
# recipe's radii, up to 2, give r <= 1, h <= 6).
_BLUR_MARGIN = _BLUR_BLOCK // 2


def _blur_windows_(x: torch.Tensor, boxes: Sequence[Tuple[int, int, int]], tmp: torch.Tensor, h: int) -> None:
    """The banded blur of :func:`_blur_` with windows starting ``h``
    samples before every block (:func:`_window_basis`), for crops ``x``
    (each contiguous) and ``tmp`` (contiguous) with at least ``h`` finite
    rows before and after them in their storage: along the width one batched
    product per crop (its operator), along the height one for all crops,
    channels and blocks (one per crop where the crops of ``x`` are apart,
    e.g. the first channel of grey crops)."""
    m, C, S, _ = x.shape
    blk = _BLUR_BLOCK
    W, nb = blk + 2 * h, S // blk
    ops = []
    for j, box in enumerate(boxes):
        nz, vals = _window_basis(S, box[0], blk, h)
        M = np.zeros(nb * blk * W, np.float32)
        M[nz] = np.dot(_blur_coefficients(box), vals)
        M = torch.from_numpy(M).view(nb, blk, W)
        xj, tj = x[j], tmp[j]
        win = xj.as_strided((nb, C * S, W), (blk, S, 1), xj.storage_offset() - h)
        out = tj.as_strided((nb, C * S, blk), (blk, S, 1), tj.storage_offset())
        torch.bmm(win, M.transpose(1, 2), out=out)  # along the width
        ops.append(M.unsqueeze(0).expand(C, -1, -1, -1))
    # along the height: a crop's stride (C S S) is C nb times a block's (blk S)
    win = tmp.as_strided((m * C * nb, W, S), (blk * S, S, 1), tmp.storage_offset() - h * S)
    if x.is_contiguous():
        torch.bmm(torch.cat(ops).reshape(m * C * nb, blk, W), win, out=x.view(m * C * nb, blk, S))
    else:
        for j in range(m):
            torch.bmm(ops[j].reshape(C * nb, blk, W), win[j * C * nb : (j + 1) * C * nb],
                      out=x[j].view(C * nb, blk, S))
    x.round_()


def _has_margins(t: torch.Tensor, margin: int) -> bool:
    """Whether each crop of ``t`` (``(m, C, S, S)``) is contiguous and
    ``margin`` elements of its storage lie before the first and after the
    last."""
    if not all(c.is_contiguous() for c in t):
        return False
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.storage_offset() >= margin and t.untyped_storage().nbytes() // t.element_size() - last - 1 >= margin


def _blur_(x: torch.Tensor, radii: Sequence[float], tmp: torch.Tensor, margins: bool = False) -> None:
    """Blur the crops ``x`` (``(m, C, S, S)`` float32 levels, each crop's
    channels contiguous) in place, crop ``j`` with PIL's
    ``GaussianBlur(radii[j])`` (see the section comment): ``P x P^T`` per
    channel, rounded to the nearest level (ties, which the float sums
    practically never hit, to even); ``tmp``: a contiguous work buffer of at
    least ``m * C * S * S`` floats.

    Banded, where ``margins`` is the caller's promise that
    :data:`_BLUR_MARGIN` rows of finite values (zeros, other crops) lie
    before and after ``x`` and ``tmp`` in their storage (the render buffers
    and :meth:`_Workspace.blur_tmp`), for sizes that are multiples of 32
    from 64 on and bands up to half a block (the recipe's radii):
    :func:`_blur_windows_`, each block of 32 outputs the product of the
    ``(32 + 2 h)`` samples from ``h`` before it with its block of the
    operator (at 224, 44 instead of 224 multiply-adds per output and axis),
    one batched product per pass. Otherwise dense: one batched product
    along the width on the ``(C S, S)`` rows of every crop, one along the
    height on every channel, for all crops at once (operators built on
    their band only)."""
    m, C, S, _ = x.shape
    boxes = [_pil_box_weights(rad) for rad in radii]
    h = 3 * (max(box[0] for box in boxes) + 1)
    if margins and S >= 64 and S % _BLUR_BLOCK == 0 and 2 * h <= _BLUR_BLOCK:
        n = m * C * S * S
        t = tmp[:n].view(m, C, S, S)
        if _has_margins(x, h * S) and _has_margins(t, h * S):
            # after the crops' part of a larger work buffer lies whatever it
            # held (never written: any bits): zeros, since weight zero times
            # a NaN would be NaN
            tmp[n : n + h * S].zero_()
            _blur_windows_(x, boxes, t, h)
            return
    P = np.zeros((m, S * S), np.float32)
    _blur_matrices_into(P, S, boxes)
    Pt = torch.from_numpy(P).view(m, S, S)
    t = tmp[: m * C * S * S].view(m, C, S, S)
    torch.bmm(x.view(m, C * S, S), Pt.transpose(1, 2), out=t.view(m, C * S, S))  # width
    torch.matmul(Pt.unsqueeze(1), t, out=x)  # height, every channel
    x.round_()


def _fail(msg: str) -> None:
    raise ValueError(f"{TRANSFORM_NAME}: {msg} {_CONFIG_HINT}")


def _as_list(config: Dict[str, Any], key: str) -> List[Any]:
    value = config[key]
    if isinstance(value, (str, bytes, dict)):
        _fail(f"{key} must be a list, got {value!r}")
    try:
        return list(value)  # list, tuple, omegaconf ListConfig, ndarray
    except TypeError:
        _fail(f"{key} must be a list, got {value!r}")


def _as_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(f"{key} must contain numbers, got {value!r}")
    if not math.isfinite(float(value)):
        _fail(f"{key} must be finite, got {value!r}")
    return float(value)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        _fail(f"{key} must contain integers, got {value!r}")
    return int(value)


def _pair(config: Dict[str, Any], key: str) -> Tuple[float, float]:
    values = _as_list(config, key)
    if len(values) != 2:
        _fail(f"{key} must be a [min, max] pair, got {values!r}")
    lo, hi = (_as_number(key, v) for v in values)
    if lo > hi:
        _fail(f"{key} must satisfy min <= max, got {values!r}")
    return lo, hi


def _probability(config: Dict[str, Any], key: str) -> float:
    p = _as_number(key, config[key])
    if not 0.0 <= p <= 1.0:
        _fail(f"{key} must be a probability in [0, 1], got {config[key]!r}")
    return p


@register_transform(TRANSFORM_NAME)
class SwavPluginMultiCrop(ClassyTransform):
    """SwAV multi-crop: one PIL image -> ``sum(nmb_crops)`` normalised crops.

    Crop ``k`` of config entry ``g`` is ``size_crops[g]`` square and goes
    through the recipe chain (docs/recipe.md, "augmentation per crop"):
    ``RandomResizedCrop(size, scale=(min_scale_crops[g], max_scale_crops[g]),
    ratio) -> RandomHorizontalFlip(flip_p) -> RandomApply(ColorJitter(0.8s,
    0.8s, 0.8s, 0.2s), color_jitter_p) -> RandomGrayscale(grayscale_p) ->
    GaussianBlur(radius ~ U(blur_radius)) with p blur_p -> ToTensor ->
    Normalize(mean, std)``; ``s`` is ``color_jitter_strength``. With
    ``blur_radius_fraction = [lo, hi]`` the radius is instead
    ``U(lo, hi) x size_crops[g]`` pixels, the same blur relative to every
    crop size (docs/small_data.md, "Blur").

    Returns a list of ``float32`` tensors ``(3, size, size)`` in config order
    (all crops of ``size_crops[0]`` first).  With ``normalize=False`` the
    tensors are the ``ToTensor`` output in ``[0, 1]`` (no Normalize).

    Randomness is one ``torch.rand`` call per image, on the per-sample
    stream of :mod:`swav_vissl_plugin.sample_seed` when the data source
    opened one, else on torch's global RNG (same torch seed, same crops).

    The colour jitter and grayscale run as compiled loops
    (:mod:`swav_vissl_plugin.colour_kernel`, Numba) when the process has
    them (:func:`colour_kernel_backend`), else as NumPy operations; both
    compute the same levels. ``use_colour_kernel = False`` on an instance
    selects the NumPy operations for it (benchmarks and tests compare the
    two).
    """

    #: False: the NumPy colour operations even where the compiled kernel runs
    use_colour_kernel = True

    def __init__(
        self,
        nmb_crops: Sequence[int],
        size_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        color_jitter_strength: float = 1.0,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_radius: Sequence[float] = (0.1, 2.0),
        blur_radius_fraction: Optional[Sequence[float]] = None,
        flip_p: float = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.228, 0.224, 0.225),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        normalize: bool = True,
    ):
        self.nmb_crops = [int(n) for n in nmb_crops]
        self.size_crops = [int(s) for s in size_crops]
        self.min_scale_crops = [float(s) for s in min_scale_crops]
        self.max_scale_crops = [float(s) for s in max_scale_crops]
        lengths = {
            len(self.nmb_crops),
            len(self.size_crops),
            len(self.min_scale_crops),
            len(self.max_scale_crops),
        }
        if len(lengths) != 1:
            raise ValueError(
                f"{TRANSFORM_NAME}: nmb_crops, size_crops, min_scale_crops, "
                "max_scale_crops must have the same length"
            )
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_p = float(color_jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.blur_p = float(blur_p)
        self.blur_radius = (float(blur_radius[0]), float(blur_radius[1]))
        self.blur_radius_fraction = (
            None if blur_radius_fraction is None
            else (float(blur_radius_fraction[0]), float(blur_radius_fraction[1]))
        )
        self.flip_p = float(flip_p)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.normalize = bool(normalize)

        s = self.color_jitter_strength
        # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) factor ranges (torchvision).
        self._jitter_lo = np.array([max(0.0, 1 - 0.8 * s)] * 3 + [-0.2 * s])
        self._jitter_hi = np.array([1 + 0.8 * s] * 3 + [0.2 * s])
        self._jitter_on = s > 0

        # Per-crop constants, in output order.
        self.total_crops = sum(self.nmb_crops)
        self._crop_size = np.repeat(self.size_crops, self.nmb_crops)
        self._scale_lo = np.repeat(self.min_scale_crops, self.nmb_crops)[:, None]
        self._scale_hi = np.repeat(self.max_scale_crops, self.nmb_crops)[:, None]
        self._log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        if self.blur_radius_fraction is None:
            self._blur_lo = np.full(self.total_crops, self.blur_radius[0])
            self._blur_hi = np.full(self.total_crops, self.blur_radius[1])
        else:
            self._blur_lo = self.blur_radius_fraction[0] * self._crop_size
            self._blur_hi = self.blur_radius_fraction[1] * self._crop_size

        mean_t = torch.tensor(self.mean, dtype=torch.float64).view(3, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float64).view(3, 1, 1)
        self._scale_t = (1.0 / (255.0 * std_t)).float()
        self._shift_t = (-mean_t / std_t).float()
        # Decided (and compiled, or loaded from Numba's cache) here, in the
        # process that builds the dataset: a bad SWAV_PLUGIN_COLOUR_KERNEL
        # fails before any loader starts, and forked loader workers inherit
        # the compiled code instead of each compiling it.
        warm_colour_kernel()

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SwavPluginMultiCrop":
        """Build from a VISSL/ClassyVision transform config (validated).

        Required: ``nmb_crops``, ``size_crops``, ``min_scale_crops``,
        ``max_scale_crops`` (lists of equal length).  Optional, recipe
        defaults: ``color_jitter_strength`` 1.0, ``color_jitter_p`` 0.8,
        ``grayscale_p`` 0.2, ``blur_p`` 0.5, ``blur_radius`` [0.1, 2.0] (pixels),
        ``blur_radius_fraction`` null (or [lo, hi]: radius as a fraction of
        the crop size, instead of ``blur_radius``), ``flip_p`` 0.5, ``mean`` [0.485, 0.456, 0.406], ``std``
        [0.228, 0.224, 0.225], ``ratio`` [3/4, 4/3], ``normalize`` True.
        Raises ``ValueError`` naming the offending key.
        """
        config = dict(config)
        config.pop("name", None)
        for key in _WRAPPER_KEYS:
            config.pop(key, None)
        unknown = sorted(set(config) - set(_REQUIRED) - set(_DEFAULTS))
        if unknown:
            _fail(
                f"unknown config key(s) {', '.join(unknown)}; expected "
                f"{', '.join(_REQUIRED + tuple(_DEFAULTS))}"
            )
        for key in _REQUIRED:
            if key not in config:
                _fail(f"missing required key {key}")
        merged = {**_DEFAULTS, **config}

        lists = {key: _as_list(merged, key) for key in _REQUIRED}
        lengths = [len(lists[key]) for key in _REQUIRED]
        if len(set(lengths)) != 1:
            _fail(
                "nmb_crops, size_crops, min_scale_crops, max_scale_crops must "
                f"have the same length, got {', '.join(map(str, lengths))}"
            )
        if lengths[0] == 0:
            _fail("nmb_crops must not be empty")
        nmb = [_as_int("nmb_crops", v) for v in lists["nmb_crops"]]
        sizes = [_as_int("size_crops", v) for v in lists["size_crops"]]
        mins = [_as_number("min_scale_crops", v) for v in lists["min_scale_crops"]]
        maxs = [_as_number("max_scale_crops", v) for v in lists["max_scale_crops"]]
        for i in range(lengths[0]):
            if nmb[i] < 1:
                _fail(f"nmb_crops[{i}] must be >= 1, got {nmb[i]}")
            if sizes[i] < 1:
                _fail(f"size_crops[{i}] must be >= 1, got {sizes[i]}")
            for key, value in (("min_scale_crops", mins[i]), ("max_scale_crops", maxs[i])):
                if not 0.0 < value <= 1.0:
                    _fail(f"{key}[{i}] must be in (0, 1], got {value}")
            if mins[i] > maxs[i]:
                _fail(
                    f"min_scale_crops[{i}] ({mins[i]}) must be <= "
                    f"max_scale_crops[{i}] ({maxs[i]})"
                )

        strength = _as_number("color_jitter_strength", merged["color_jitter_strength"])
        if not 0.0 <= strength <= 2.5:
            # hue range 0.2 * s must stay within torchvision's [0, 0.5]
            _fail(f"color_jitter_strength must be in [0, 2.5], got {strength}")
        probs = {
            key: _probability(merged, key)
            for key in ("color_jitter_p", "grayscale_p", "blur_p", "flip_p")
        }
        blur_radius = _pair(merged, "blur_radius")
        if blur_radius[0] < 0:
            _fail(f"blur_radius must be >= 0, got {list(blur_radius)}")
        blur_fraction = None
        if merged["blur_radius_fraction"] is not None:
            if "blur_radius" in config:
                _fail("set blur_radius (pixels) or blur_radius_fraction (of the crop size), not both")
            blur_fraction = _pair(merged, "blur_radius_fraction")
            if blur_fraction[0] < 0:
                _fail(f"blur_radius_fraction must be >= 0, got {list(blur_fraction)}")
        ratio = _pair(merged, "ratio")
        if ratio[0] <= 0:
            _fail(f"ratio must be > 0, got {list(ratio)}")
        mean = [_as_number("mean", v) for v in _as_list(merged, "mean")]
        std = [_as_number("std", v) for v in _as_list(merged, "std")]
        if len(mean) != 3:
            _fail(f"mean must have 3 entries, got {mean}")
        if len(std) != 3 or min(std) <= 0:
            _fail(f"std must have 3 positive entries, got {std}")
        if not isinstance(merged["normalize"], bool):
            _fail(f"normalize must be true or false, got {merged['normalize']!r}")

        return cls(
            nmb_crops=nmb,
            size_crops=sizes,
            min_scale_crops=mins,
            max_scale_crops=maxs,
            color_jitter_strength=strength,
            blur_radius=blur_radius,
            blur_radius_fraction=blur_fraction,
            mean=mean,
            std=std,
            ratio=ratio,
            normalize=merged["normalize"],
            **probs,
        )

    # -------------------------------------------------------------- sampling
    def sample_params(
        self, width: int, height: int, generator: Optional[torch.Generator] = None
    ) -> List[CropParams]:
        """Draw every random choice for the crops of a ``width x height`` image.

        Same distributions as the torchvision chain: RandomResizedCrop's box
        (area ~ U(min, max) * image area, log aspect ~ U(log ratio), first of
        10 attempts that fits, else the centred fallback; top/left uniform
        integers), flip/jitter/grayscale/blur Bernoulli draws, ColorJitter
        factors ~ U and a uniformly random order, blur radius ~ U(blur_radius)
        (or ``U(blur_radius_fraction) x`` the crop size).
        Uses one ``torch.rand`` call, on ``generator`` when given.
        """
        n = self.total_crops
        u = torch.rand(n, _N_DRAWS, dtype=torch.float64, generator=generator).numpy()
        W, H = int(width), int(height)

        # RandomResizedCrop.get_params, vectorised over crops and attempts.
        target = (W * H) * (self._scale_lo + (self._scale_hi - self._scale_lo) * u[:, _C_AREA])
        lr0, lr1 = self._log_ratio
        aspect = np.exp(lr0 + (lr1 - lr0) * u[:, _C_LOGR])
        w = np.rint(np.sqrt(target * aspect))  # rint == Python round (half even)
        h = np.rint(np.sqrt(target / aspect))
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = fits.argmax(axis=1)
        rows = np.arange(n)
        cw = w[rows, first].astype(np.int64)
        ch = h[rows, first].astype(np.int64)
        top = np.minimum(np.floor(u[:, _C_TOP] * (H - ch + 1)), H - ch).astype(np.int64)
        left = np.minimum(np.floor(u[:, _C_LEFT] * (W - cw + 1)), W - cw).astype(np.int64)
        failed = ~fits.any(axis=1)
        if failed.any():
            fh, fw = self._fallback_box(W, H)
            ch[failed], cw[failed] = fh, fw
            top[failed], left[failed] = (H - fh) // 2, (W - fw) // 2

        flip = u[:, _C_FLIP] < self.flip_p
        jit = (u[:, _C_JIT] < self.color_jitter_p) & self._jitter_on
        factors = self._jitter_lo + (self._jitter_hi - self._jitter_lo) * u[:, _C_FACTORS]
        order = np.argsort(u[:, _C_ORDER], axis=1)
        gray = u[:, _C_GRAY] < self.grayscale_p
        blur = u[:, _C_BLUR] < self.blur_p
        radius = self._blur_lo + (self._blur_hi - self._blur_lo) * u[:, _C_RADIUS]

        # Python values once per array (a NumPy scalar per field and crop
        # costs more than the whole vectorised draw)
        jits, facs, orders, radii = jit.tolist(), factors.tolist(), order.tolist(), radius.tolist()
        blurs = blur.tolist()
        return [
            CropParams(
                size, t, l, hh, ww, f,
                JitterParams(tuple(orders[k]), *facs[k]) if jits[k] else None,
                g, radii[k] if blurs[k] else None,
            )
            for k, (size, t, l, hh, ww, f, g) in enumerate(zip(
                self._crop_size.tolist(), top.tolist(), left.tolist(), ch.tolist(), cw.tolist(),
                flip.tolist(), gray.tolist(),
            ))
        ]

    def _fallback_box(self, W: int, H: int) -> Tuple[int, int]:
        # torchvision's central-crop fallback after 10 failed attempts.
        in_ratio = W / H
        lo, hi = self.ratio
        if in_ratio < lo:
            return int(round(W / lo)), W
        if in_ratio > hi:
            return H, int(round(H * hi))
        return H, W

    # ------------------------------------------------------------- rendering
    def render_levels(
        self,
        source: torch.Tensor,
        params: Sequence[CropParams],
        timers: Optional[Dict[str, float]] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Render the crops of one image as float32 8-bit levels (integers
        0..255) after every augmentation, before ToTensor / Normalize.

        Returns ``(buffers, crops)``: ``buffers``, for each run of consecutive
        crops of the same size, one ``(n, 3, size, size)`` tensor holding
        them (blurred crops first, so that they are blurred together);
        ``crops``, the ``len(params)`` crops in the order of ``params``, each
        a ``(3, size, size)`` view into a buffer.

        ``source``: the image as an ``(H, W, C)`` uint8 tensor (RGB in
        channels 0-2). In the recipe's order: all resized crops and flips
        first (written planar into the float32 buffers, while the source is
        in cache), then per crop the colour jitter (its four adjustments in
        the crop's random order) and grayscale (NumPy, in place), then the
        blur of the blurred crops of each size (torch matrix products).

        ``timers``: when given, the process CPU time of each step (resize,
        brightness, contrast, saturation, hue, grayscale, blur) is added to
        it, in seconds (benchmarks/bench_transforms.py ``--stages``)."""
        clock = _StageClock(timers)
        runs: List[Tuple[int, int]] = []
        for k, p in enumerate(params):
            if runs and params[runs[-1][0]].size == p.size:
                runs[-1] = (runs[-1][0], k + 1)
            else:
                runs.append((k, k + 1))
        buffers: List[torch.Tensor] = []
        crops: List[Optional[torch.Tensor]] = [None] * len(params)
        source_np = source.numpy()
        kernel = _colour_kernel() if self.use_colour_kernel else None
        for a, b in runs:
            size = params[a].size
            ws = _workspace(size)
            # slots: blurred colour crops, blurred grey crops, the others
            colour = [k for k in range(a, b) if params[k].blur_radius is not None and not params[k].grayscale]
            grey = [k for k in range(a, b) if params[k].blur_radius is not None and params[k].grayscale]
            slots = colour + grey + [k for k in range(a, b) if params[k].blur_radius is None]
            # zeros around the buffer: read, with weight zero, by the blur
            x = _with_margins((b - a) * 3 * size * size, _BLUR_MARGIN * size).view(b - a, 3, size, size)
            xn = x.numpy()
            clock.start()
            for i, k in enumerate(slots):
                _resized_crop_into(source_np, params[k], xn[i])
            clock.stop("resize")
            for i, k in enumerate(slots):
                p = params[k]
                X = xn[i].reshape(3, -1)
                if kernel is not None:
                    j = p.jitter
                    if j is not None:
                        clock.start()
                        kernel(X, j.order, j[1:4], _hue_shift_byte(j.hue), p.grayscale)
                        clock.stop("jitter + grayscale (compiled)")
                    elif p.grayscale:
                        clock.start()
                        kernel(X, (), (1.0, 1.0, 1.0), 0, True)
                        clock.stop("jitter + grayscale (compiled)")
                    continue
                if p.jitter is not None:
                    for op in p.jitter.order:
                        clock.start()
                        if op == _HUE:
                            _hue_(X, _hue_shift_byte(p.jitter.hue), ws)
                        else:
                            _JITTER_OPS[op](X, p.jitter[1 + op], ws)
                        clock.stop(_JITTER_NAMES[op])
                if p.grayscale:
                    clock.start()
                    _grayscale_(X, ws)
                    clock.stop("grayscale")
            if colour or grey:
                clock.start()
                tmp = ws.blur_tmp(len(colour) + len(grey))
                if colour:
                    _blur_(x[: len(colour)], [params[k].blur_radius for k in colour], tmp, margins=True)
                if grey:  # three equal channels: blur one, copy it
                    g = x[len(colour) : len(colour) + len(grey)]
                    _blur_(g[:, :1], [params[k].blur_radius for k in grey], tmp, margins=True)
                    g[:, 1:].copy_(g[:, :1].expand(-1, 2, -1, -1))
                clock.stop("blur")
            for k, crop in zip(slots, x.unbind(0)):
                crops[k] = crop
            buffers.append(x)
        return buffers, crops  # type: ignore[return-value]

    def render(self, source: torch.Tensor, params: Sequence[CropParams]) -> List[np.ndarray]:
        """The crops of ``params`` as ``(size, size, 3)`` uint8 RGB arrays
        (grayscale crops have three equal channels), before ToTensor."""
        return [
            np.ascontiguousarray(t.permute(1, 2, 0).numpy().astype(np.uint8))
            for t in self.render_levels(source, params)[1]
        ]

    def apply_params(
        self, img: Image.Image, p: CropParams, source: Optional[torch.Tensor] = None
    ) -> Image.Image:
        """Render one crop of an image as an RGB PIL image, before
        ToTensor/Normalize. ``source``: ``img`` as an ``(H, W, 3)`` uint8
        tensor, when the caller has it already."""
        if source is None:
            source = _as_uint8_tensor(to_rgb(img))
        return Image.fromarray(self.render(source, [p])[0])

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        if _BLAS_CHECKED_PID[0] != os.getpid():
            _single_blas_thread_in_loader_worker()
        img = to_rgb(image)
        # The data source's per-sample stream (sample_seed.py), else torch's RNG.
        params = self.sample_params(*img.size, generator=sample_seed.take_generator())
        source = _as_uint8_tensor(img)  # one decoded copy for all crops
        buffers, crops = self.render_levels(source, params)
        for x in buffers:
            if self.normalize:
                # fused ToTensor + Normalize: (x / 255 - mean) / std == x * scale + shift
                x.mul_(self._scale_t).add_(self._shift_t)
            else:
                x.div_(255.0)  # exactly ToTensor
        return crops

    def __repr__(self) -> str:
        return (
            f"{TRANSFORM_NAME}(nmb_crops={self.nmb_crops}, size_crops={self.size_crops}, "
            f"min_scale_crops={self.min_scale_crops}, max_scale_crops={self.max_scale_crops}, "
            f"color_jitter_strength={self.color_jitter_strength}, "
            f"color_jitter_p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}, blur_radius={list(self.blur_radius)}, "
            f"blur_radius_fraction={self.blur_radius_fraction and list(self.blur_radius_fraction)}, "
            f"flip_p={self.flip_p}, mean={list(self.mean)}, std={list(self.std)}, "
            f"ratio={list(self.ratio)}, normalize={self.normalize})"
        )


# VISSL: a transform in _TRANSFORMS_WITH_COPIES has its output list flattened
# into the sample and label/data_valid/data_idx replicated per copy.  The list
# object is shared with DEFAULT_TRANSFORM_TYPES, so appending is enough.
if TRANSFORM_NAME not in _vissl_wrapper._TRANSFORMS_WITH_COPIES:
    _vissl_wrapper._TRANSFORMS_WITH_COPIES.append(TRANSFORM_NAME)


_BLAS_CHECKED_PID = [0]


def _single_blas_thread_in_loader_worker() -> None:
    """In a DataLoader worker process, limit NumPy's BLAS to one thread.

    PyTorch sets its own intra-op threads to 1 in loader workers; NumPy's
    OpenBLAS keeps one thread per core, and the transform's small products
    (grey levels, hue indices) then wake threads that every worker on the
    node starts, contending for the cores the other workers use. Checked
    once per process (forked workers inherit the parent's flag, hence the
    pid)."""
    _BLAS_CHECKED_PID[0] = os.getpid()
    if torch.utils.data.get_worker_info() is None:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it nothing changes
        return
    threadpool_limits(1, user_api="blas")


# ------------------------------------------------------------------ collator
def _position_major(values: List[Any], num_positions: int) -> torch.Tensor:
    """``[sample][position]`` values -> tensor ordered position-major, i.e.
    ``torch.stack([torch.tensor(values[i])[p] for p in positions for i in
    samples])`` as VISSL's multicrop_collator computes it, in one call."""
    try:
        t = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dim() < 2 or t.shape[1] != num_positions:
        per_sample = [torch.tensor(v) for v in values]
        return torch.stack([s[p] for p in range(num_positions) for s in per_sample])
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])


@register_collator(COLLATOR_NAME)
def swav_plugin_multicrop_collator(
    batch: List[Dict[str, Any]], create_multidimensional_tensor: bool = False
) -> Dict[str, list]:
    """Collate multi-crop samples exactly like VISSL's ``multicrop_collator``.

    Input: ``B`` samples ``{"data": [c_0, ..., c_{K-1}], "label": [K],
    "data_valid": [K], "data_idx": [K]}`` (as produced by
    ``SwavPluginMultiCrop`` through ``SSLTransformsWrapper``).

    Output::

        {"data": [[stack_i c_0^i (B,3,s0,s0), ..., stack_i c_{K-1}^i]],
         "label": [tensor (K*B,)], "data_valid": [tensor (K*B,)],
         "data_idx": [tensor (K*B,)]}

    with label/data_valid/data_idx in crop-position-major order (entry
    ``p * B + i`` belongs to crop ``p`` of sample ``i``), matching the order
    of the concatenated crop batches in ``multi_res_input_forward``.  One
    ``default_collate`` (``torch.stack``, into shared memory inside a
    DataLoader worker) per crop position and one ``torch.tensor`` per key.
    """
    if not batch:
        raise ValueError(f"{COLLATOR_NAME}: empty batch")
    for key in ("data", "label", "data_valid", "data_idx"):
        if key not in batch[0]:
            raise KeyError(f"{COLLATOR_NAME}: '{key}' not found in sample")
    num_positions = len(batch[0]["data"])
    for i, sample in enumerate(batch):
        if len(sample["data"]) != num_positions:
            raise ValueError(
                f"{COLLATOR_NAME}: sample {i} has {len(sample['data'])} crops, "
                f"sample 0 has {num_positions}"
            )

    output_data = [
        default_collate([sample["data"][p] for sample in batch])
        for p in range(num_positions)
    ]
    if create_multidimensional_tensor:
        output_data = MultiDimensionalTensor.from_tensors(output_data)
    return {
        "data": [output_data],
        "label": [_position_major([s["label"] for s in batch], num_positions)],
        "data_valid": [_position_major([s["data_valid"] for s in batch], num_positions)],
        "data_idx": [_position_major([s["data_idx"] for s in batch], num_positions)],
    }
