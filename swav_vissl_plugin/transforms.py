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
* the image is converted once to a uint8 tensor shared by all its crops;
  crop-then-resize is torch's uint8 ``interpolate(bilinear, antialias=True)``
  on the box (channels-last SIMD kernels): the filter of PIL's
  ``resize(BILINEAR)`` that torchvision's ``RandomResizedCrop`` applies,
  with values within 1 of PIL's (fixed-point rounding);
* every crop then lives in one float32 buffer of 8-bit levels per crop size,
  from the resize to the normalised output (no PIL images, no 8-bit round
  trips): brightness, contrast, saturation and grayscale are PIL's blends
  and ``convert("L")`` written as the same float32 operations; the hue shift
  is PIL's HSV round trip in closed form (hue byte from PIL's own table,
  exact rational arithmetic for the rest, equal to torchvision's
  ``adjust_hue`` for every colour and shift);
* the Gaussian blur is PIL's six box passes composed into one linear
  operator per axis, applied as (banded) matrix products to all blurred
  crops of a size, rounded once;
* ToTensor + Normalize is one fused ``x * 1/(255 std) - mean/std`` in place
  over all crops of the same size.

Importing this module also appends ``"SwavPluginMultiCrop"`` to VISSL's
``_TRANSFORMS_WITH_COPIES`` (so ``SSLTransformsWrapper`` flattens the crop
list and replicates ``label``/``data_valid``/``data_idx`` per crop) and
registers the collator ``"swav_plugin_multicrop_collator"``, whose output has
exactly the structure, shapes and dtypes of VISSL's ``multicrop_collator``.
"""

import functools
import math
import numbers
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


def _as_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as an ``(H, W, 3)`` uint8 tensor (one copy; read-only
    use: the crops are copied out of it)."""
    arr = np.asarray(img)
    if not arr.flags.writeable:
        with warnings.catch_warnings():
            # torch warns that it cannot protect a read-only array from writes
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _resized_crop_into(source: torch.Tensor, p: CropParams, out: np.ndarray) -> None:
    """Crop ``p``'s box of ``source`` (``(H, W, 3)`` uint8), resize it to
    ``p.size`` square, bilinear with antialiasing, flip it if ``p.flip``, and
    write it planar into ``out`` (``(3, size, size)``, any dtype).

    torchvision's ``RandomResizedCrop`` on a PIL image is PIL's crop then
    ``resize(BILINEAR)`` (a triangle filter widened by the downscaling factor,
    edge pixels replicated at the box border); torch's uint8
    ``interpolate(mode="bilinear", antialias=True)`` implements the same
    filter (ported from Pillow) with SIMD kernels for channels-last RGB, about
    twice as fast; its values differ from PIL's by at most 1 (fixed-point
    rounding; tests/test_transforms.py checks it). The flip is a reversed
    view read by the one copy that makes the crop planar."""
    box = source[p.top : p.top + p.height, p.left : p.left + p.width]
    if p.height == p.size and p.width == p.size:
        hwc = box.numpy()
    else:
        ws = _workspace(p.size)
        x = _box_buffer(p.height * p.width * 3)[: p.height * p.width * 3]
        x = x.view(1, p.height, p.width, 3)
        x.copy_(box)
        y = ws.resized  # (1, 3, size, size) channels-last
        torch.ops.aten._upsample_bilinear2d_aa.out(
            x.permute(0, 3, 1, 2), [p.size, p.size], False, None, None, out=y
        )
        hwc = y[0].permute(1, 2, 0).numpy()  # channels-last memory: a plain view
    chw = hwc.transpose(2, 0, 1)
    np.copyto(out, chw[:, :, ::-1] if p.flip else chw, casting="unsafe")


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
# * PIL's RGB -> L is ``(19595 r + 38470 g + 7471 b + 0x8000) >> 16``; the
#   products and sums stay below 2**24, so a float32 product is exact.
# Working on float32 levels in place keeps every crop in one buffer from the
# resize to the normalised output (no PIL images, no 8-bit copies).
# ---------------------------------------------------------------------------
_F32 = np.float32
_LUMA_W = np.array([[19595.0, 38470.0, 7471.0]], dtype=np.float32)
_HUE = 3  # index of the hue adjustment in JitterParams.order


class _Workspace:
    """Work arrays for crops of up to ``size x size`` pixels.

    Kept per thread and reused from image to image (:func:`_workspace`), so
    that the colour operations, the resize and the blur allocate no
    temporaries (freshly allocated memory costs a page fault per 4 KiB on
    first touch)."""

    def __init__(self, size: int):
        P = size * size
        self.v = np.empty(P, np.float32)
        self.c = np.empty(P, np.float32)
        self.t = np.empty(P, np.float32)
        self.u = np.empty(P, np.float32)
        self.idx = torch.empty(P, dtype=torch.int32)
        self.K = np.empty((3, P), np.float32)
        self.K2 = np.empty((3, P), np.float32)
        self.L = np.empty((1, P), np.float32)
        self.resized = torch.empty((1, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        self.blur: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def blur_buffers(self, size: int, h: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row- and column-padded ``(size + 2h, 3 size)`` and ``(3 size,
        size + 2h)`` buffers whose margins stay zero."""
        if h not in self.blur:
            self.blur[h] = (
                torch.zeros((size + 2 * h, 3 * size)),
                torch.zeros((3 * size, size + 2 * h)),
            )
        return self.blur[h]


_TLS = threading.local()


def _workspace(size: int) -> _Workspace:
    cache = getattr(_TLS, "workspaces", None)
    if cache is None:
        cache = _TLS.workspaces = {}
    if size not in cache:
        cache[size] = _Workspace(size)
    return cache[size]


def _box_buffer(numel: int) -> torch.Tensor:
    """A per-thread uint8 buffer of at least ``numel`` bytes (crop boxes)."""
    buf = getattr(_TLS, "box", None)
    if buf is None or buf.numel() < numel:
        buf = _TLS.box = torch.empty(numel, dtype=torch.uint8)
    return buf


def _luma(X: np.ndarray, ws: _Workspace) -> np.ndarray:
    """PIL's ``convert("L")`` of the planar crop ``X``: ``(1, P)`` levels."""
    L = np.matmul(_LUMA_W, X, out=ws.L[:, : X.shape[1]])
    L += _F32(32768.0)
    L *= _F32(1.0 / 65536.0)
    return np.floor(L, out=L)


def _clip_trunc(X: np.ndarray) -> None:
    # torch's clamp_ on the same memory: 2.5x faster than np.clip here
    torch.from_numpy(X).clamp_(0.0, 255.0).trunc_()


def _brightness_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Brightness: blend with black, 0 + f * (x - 0) == f * x.
    X *= _F32(factor)
    _clip_trunc(X)


def _contrast_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Contrast: blend with the grey level int(mean(L) + 0.5),
    # the mean as ImageStat computes it (exact integer sum / pixel count).
    L = _luma(X, ws)
    m = _F32(int(float(L.sum(dtype=np.float64)) / L.size + 0.5))
    X -= m
    X *= _F32(factor)
    X += m
    _clip_trunc(X)


def _saturation_(X: np.ndarray, factor: float, ws: _Workspace) -> None:
    # ImageEnhance.Color: blend with the pixel's own grey level.
    L = _luma(X, ws)
    X -= L
    X *= _F32(factor)
    X += L
    _clip_trunc(X)


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
    return np.asarray(Image.fromarray(pix).convert("HSV"))[..., 0].ravel().astype(np.float32)


_HUE_OF_DIFFS = _build_hue_table()
_HUE_OF_DIFFS_T = torch.from_numpy(_HUE_OF_DIFFS)
_HUE_INDEX_OFFSET = 255.0 * 511.0 + 255.0
# Phase of R, G, B on the hue circle in 1/255 of a sector (6 sectors = 1530),
# minus the centre 510 of the ramp X (see _hue_).
_HUE_PHASE = np.array([[5 * 255.0 - 510], [3 * 255.0 - 510], [1 * 255.0 - 510]], dtype=np.float32)


def _hue_(X: np.ndarray, shift: int, ws: _Workspace) -> None:
    """torchvision's PIL ``adjust_hue``: the HSV round trip with the hue byte
    shifted by ``shift`` modulo 256, level for level.

    RGB -> HSV: ``v = max``, the saturation byte ``s = floor(255 (max -
    min) / max)`` (exact rational arithmetic equals PIL's float code for
    every (chroma, max) pair) and the hue byte ``h`` from PIL's own table
    (:func:`_build_hue_table`; its float rounding differs from exact
    arithmetic on 0.2 % of the colours, so it is looked up, not computed).
    HSV -> RGB: with ``h' = (h + shift) mod 256``, each channel ``n`` is ``v
    - round(v s X_n / 65025)`` where ``X_n = clip(510 - d_n, 0, 255)``,
    ``d_n`` the distance on a circle of 1530 between ``6 h' + phase_n``
    (``phase`` 5, 3, 1 sectors of 255 for R, G, B) and 510: the channel's
    position on PIL's piecewise-linear hue ramp in 1/255 units (255: PIL's
    ``p``, 0: ``v``, else its ``q`` or ``t``). Evaluated as ``rint(X_n * (v s
    / 65025))`` in float32 this rounding equals PIL's for all 2**24 (v, s, X)
    (checked exhaustively when written; the tests compare whole images)."""
    r, g, b = X
    P = X.shape[1]
    v = np.maximum(r, g, out=ws.v[:P])
    np.maximum(v, b, out=v)
    c = np.minimum(r, g, out=ws.c[:P])
    np.minimum(c, b, out=c)
    np.subtract(v, c, out=c)  # chroma
    t = np.subtract(r, g, out=ws.t[:P])
    t *= _F32(511.0)
    t += g
    t -= b
    t += _F32(_HUE_INDEX_OFFSET)
    # PIL's hue byte by table look-up (torch's int32 gather: faster than np.take)
    idx = ws.idx[:P]
    idx.copy_(torch.from_numpy(t))
    torch.index_select(_HUE_OF_DIFFS_T, 0, idx, out=torch.from_numpy(t))
    h = t
    h += _F32(shift)
    u = np.multiply(h, _F32(1.0 / 256.0), out=ws.u[:P])  # exact: power of two
    np.floor(u, out=u)
    u *= _F32(256.0)
    h -= u  # (h + shift) mod 256
    w = np.multiply(c, _F32(255.0), out=u)
    np.add(v, _F32(1e-30), out=c)  # no-op for v >= 1; v = 0 (then c = 0) gives 0
    w /= c
    np.floor(w, out=w)  # saturation byte s
    w *= v  # v s, exact (< 2**16)
    w *= _F32(1.0 / 65025.0)
    h *= _F32(6.0)
    # |position - 510| on the hue circle of 1530 (distance to the ramp's centre)
    K = np.add(h, _HUE_PHASE, out=ws.K[:, :P])  # 6 h' + phase - 510, in [-255, 2295]
    np.abs(K, out=K)
    K2 = np.subtract(K, _F32(1530.0), out=ws.K2[:, :P])
    np.abs(K2, out=K2)
    np.minimum(K, K2, out=K)
    np.subtract(_F32(510.0), K, out=K)
    torch.from_numpy(K).clamp_(0.0, 255.0)  # X_n
    K *= w
    np.rint(K, out=K)  # never a tie: the exact value is never k + 1/2
    np.subtract(v, K, out=X)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _hue_)
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")


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
# ---------------------------------------------------------------------------
_BLUR_BLOCK = 32  # output columns / rows per block of the banded products


def _pil_box_weights(radius: float) -> Tuple[int, int, int]:
    """``(r, ww, fw)`` of one box pass of PIL's ``GaussianBlur(radius)``:
    Pillow's ``_gaussian_blur_radius`` (3 passes) and
    ``ImagingHorizontalBoxBlur``, with their float32 arithmetic."""
    f32 = np.float32
    rad = f32(radius)
    sigma2 = rad * rad / f32(3)
    L = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    l = f32(math.floor((float(L) - 1.0) / 2.0))
    a = (f32(2) * l + f32(1)) * (l * (l + f32(1)) - f32(3) * sigma2)
    a = a / (f32(6) * (sigma2 - (l + f32(1)) * (l + f32(1))))
    box = l + a
    r = int(box)
    ww = int(f32(1 << 24) / (box * f32(2) + f32(1)))
    fw = ((1 << 24) - (r * 2 + 1) * ww) // 2
    return r, ww, fw


@functools.lru_cache(maxsize=None)
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


def _pass_matrix(S: int, r: int, ww: int, fw: int) -> np.ndarray:
    """One PIL box pass over ``S`` samples as an ``(S, S)`` float64 matrix
    (row = output sample), edges replicated."""
    A, B = _box_shift_sums(S, r)
    return A * (ww / float(1 << 24)) + B * (fw / float(1 << 24))


def _blur_matrix(S: int, box: Tuple[int, int, int]) -> np.ndarray:
    """PIL's three box passes (``box`` = ``(r, ww, fw)``, from
    :func:`_pil_box_weights`) along one axis of ``S`` samples, composed:
    ``(S, S)`` float32, row = output sample.

    Away from the edges the product is the 3-fold convolution of the box
    kernel (a band of half-width ``h = 3 (r + 1)``); only the first and last
    ``h`` rows see the replicated edges. Those come from the product of the
    pass matrices of a ``2 h + 1``-sample line (which has the same edge
    rows), so the cost does not grow with ``S**3``."""
    r, ww, fw = box
    h = 3 * (r + 1)
    if S <= 2 * h + 1:
        K = _pass_matrix(S, r, ww, fw)
        return (K @ K @ K).astype(np.float32)
    taps = np.full(2 * r + 3, ww / float(1 << 24))
    taps[0] = taps[-1] = fw / float(1 << 24)
    kernel = np.convolve(np.convolve(taps, taps), taps).astype(np.float32)  # 2 h + 1 taps
    band = np.zeros((S, S + 2 * h + 1), np.float32)
    np.lib.stride_tricks.as_strided(
        band, shape=(S, 2 * h + 1), strides=(band.strides[0] + band.strides[1], band.strides[1]),
        writeable=True,
    )[:] = kernel
    P = np.ascontiguousarray(band[:, h : h + S])
    K = _pass_matrix(2 * h + 1, r, ww, fw)
    edge = (K @ K @ K)[:h, : 2 * h]
    P[:h, : 2 * h] = edge
    P[S - h :, S - 2 * h :] = edge[::-1, ::-1]
    return P


def _band_blocks(P: np.ndarray, h: int, blk: int) -> torch.Tensor:
    """The blocks of the banded ``(S, S)`` matrix ``P`` for blocked products:
    block ``b`` (``(blk, blk + 2h)``) maps the input samples ``b blk - h ..
    b blk + blk + h - 1`` (zero outside the line) to the outputs ``b blk ..
    b blk + blk - 1``."""
    S = P.shape[0]
    Pp = np.zeros((S, S + 2 * h), np.float32)
    Pp[:, h : h + S] = P
    rs, cs = Pp.strides
    view = np.lib.stride_tricks.as_strided(
        Pp, shape=(S // blk, blk, blk + 2 * h), strides=(blk * (rs + cs), rs, cs)
    )
    return torch.from_numpy(np.ascontiguousarray(view))


def _blur_(x: torch.Tensor, crops: Sequence[int], radii: Sequence[float]) -> None:
    """Blur the crops ``x[crops]`` (``x``: ``(N, 3, S, S)`` float32 levels)
    in place, crop ``crops[j]`` with PIL's ``GaussianBlur(radii[j])`` (see
    the section comment): ``P x P^T`` per channel, rounded.

    The crops are copied into rows-channels-columns order, so that each axis
    is one matrix product over all channels: ``P @ x`` on ``(S, 3 S)``, then
    ``x @ P^T`` on ``(3 S, S)``. Up to 128 samples the products are dense;
    above, with ``S`` a multiple of 32 and a band narrower than 32 (else
    dense again: no cheaper), banded: each block of 32 outputs is the
    product of a ``(32 + 2 h)``-sample window of the zero-padded input with
    the matching block of ``P`` (``h`` the band's half-width), all blocks in
    one batched product that reads the overlapping windows in place (a
    quarter of the dense product's arithmetic at 224)."""
    _, C, S, _ = x.shape
    n = len(crops)
    hcw = torch.empty((n, S, C, S))
    for j, k in enumerate(crops):
        hcw[j].copy_(x[k].permute(1, 0, 2))
    boxes = [_pil_box_weights(float(rad)) for rad in radii]
    mats = [_blur_matrix(S, box) for box in boxes]
    band = max(3 * (box[0] + 1) for box in boxes)
    blk = _BLUR_BLOCK
    if S <= 128 or S % blk or 2 * band > blk:
        P = torch.from_numpy(np.stack(mats))  # (n, S, S)
        PT = P.transpose(1, 2).contiguous()
        y = torch.bmm(P, hcw.view(n, S, C * S))  # along height
        torch.bmm(y.view(n, S * C, S), PT, out=hcw.view(n, S * C, S))  # along width
    else:
        h, nb = band, S // blk
        xp, zp = _workspace(S).blur_buffers(S, h)  # zero margins
        for k in range(n):
            Mt = _band_blocks(mats[k], h, blk)  # (nb, blk, blk + 2h)
            xp[h : h + S] = hcw[k].view(S, C * S)
            win = xp.as_strided((nb, blk + 2 * h, C * S), (blk * C * S, C * S, 1))
            torch.bmm(Mt, win, out=hcw[k].view(nb, blk, C * S))  # along height
            zp[:, h : h + S] = hcw[k].view(S * C, S)
            win = zp.as_strided((nb, S * C, blk + 2 * h), (blk, S + 2 * h, 1))
            torch.bmm(win, Mt.transpose(1, 2), out=hcw[k].view(S * C, nb, blk).permute(1, 0, 2))  # width
    hcw.add_(0.5).floor_()
    for j, k in enumerate(crops):
        x[k].copy_(hcw[j].permute(1, 0, 2))


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
    Normalize(mean, std)``; ``s`` is ``color_jitter_strength``.

    Returns a list of ``float32`` tensors ``(3, size, size)`` in config order
    (all crops of ``size_crops[0]`` first).  With ``normalize=False`` the
    tensors are the ``ToTensor`` output in ``[0, 1]`` (no Normalize).

    Randomness is one ``torch.rand`` call per image, on the per-sample
    stream of :mod:`swav_vissl_plugin.sample_seed` when the data source
    opened one, else on torch's global RNG (same torch seed, same crops).
    """

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

        mean_t = torch.tensor(self.mean, dtype=torch.float64).view(3, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float64).view(3, 1, 1)
        self._scale_t = (1.0 / (255.0 * std_t)).float()
        self._shift_t = (-mean_t / std_t).float()

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SwavPluginMultiCrop":
        """Build from a VISSL/ClassyVision transform config (validated).

        Required: ``nmb_crops``, ``size_crops``, ``min_scale_crops``,
        ``max_scale_crops`` (lists of equal length).  Optional, recipe
        defaults: ``color_jitter_strength`` 1.0, ``color_jitter_p`` 0.8,
        ``grayscale_p`` 0.2, ``blur_p`` 0.5, ``blur_radius`` [0.1, 2.0],
        ``flip_p`` 0.5, ``mean`` [0.485, 0.456, 0.406], ``std``
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
        factors ~ U and a uniformly random order, blur radius ~ U(blur_radius).
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
        r0, r1 = self.blur_radius
        radius = r0 + (r1 - r0) * u[:, _C_RADIUS]

        params = []
        for k in range(n):
            jitter = None
            if jit[k]:
                b, c, s, hue = factors[k].tolist()
                jitter = JitterParams(tuple(order[k].tolist()), b, c, s, hue)
            params.append(
                CropParams(
                    size=int(self._crop_size[k]),
                    top=int(top[k]),
                    left=int(left[k]),
                    height=int(ch[k]),
                    width=int(cw[k]),
                    flip=bool(flip[k]),
                    jitter=jitter,
                    grayscale=bool(gray[k]),
                    blur_radius=float(radius[k]) if blur[k] else None,
                )
            )
        return params

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
    ) -> List[torch.Tensor]:
        """Render the crops of one image: for each run of consecutive crops
        of the same size, one ``(n, 3, size, size)`` float32 tensor of 8-bit
        levels (integers 0..255) after every augmentation, before ToTensor /
        Normalize.

        ``source``: the image as an ``(H, W, 3)`` uint8 tensor. In the
        recipe's order: all resized crops and flips first (written planar
        into the float32 buffers, while the source is in cache), then per
        crop the colour jitter (its four adjustments in the crop's random
        order) and grayscale (NumPy, in place), then the blur of the blurred
        crops of each size together (torch matrix products).

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
        xs = [torch.empty((b - a, 3, params[a].size, params[a].size)) for a, b in runs]
        clock.start()
        for (a, b), x in zip(runs, xs):
            xn = x.numpy()
            for k in range(a, b):
                _resized_crop_into(source, params[k], xn[k - a])
        clock.stop("resize")
        for (a, b), x in zip(runs, xs):
            xn = x.numpy()
            ws = _workspace(params[a].size)
            for k in range(a, b):
                p, X = params[k], xn[k - a].reshape(3, -1)
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
        clock.start()
        for (a, b), x in zip(runs, xs):
            blurred = [k - a for k in range(a, b) if params[k].blur_radius is not None]
            if blurred:
                _blur_(x, blurred, [params[a + k].blur_radius for k in blurred])
        clock.stop("blur")
        return xs

    def render(self, source: torch.Tensor, params: Sequence[CropParams]) -> List[np.ndarray]:
        """The crops of ``params`` as ``(size, size, 3)`` uint8 RGB arrays
        (grayscale crops have three equal channels), before ToTensor."""
        return [
            np.ascontiguousarray(t.permute(1, 2, 0).numpy().astype(np.uint8))
            for x in self.render_levels(source, params)
            for t in x
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
        img = to_rgb(image)
        # The data source's per-sample stream (sample_seed.py), else torch's RNG.
        params = self.sample_params(*img.size, generator=sample_seed.take_generator())
        source = _as_uint8_tensor(img)  # one decoded copy for all crops
        outputs: List[torch.Tensor] = []
        for x in self.render_levels(source, params):
            if self.normalize:
                # fused ToTensor + Normalize: (x / 255 - mean) / std == x * scale + shift
                x.mul_(self._scale_t).add_(self._shift_t)
            else:
                x.div_(255.0)  # exactly ToTensor
            outputs.extend(x.unbind(0))
        return outputs

    def __repr__(self) -> str:
        return (
            f"{TRANSFORM_NAME}(nmb_crops={self.nmb_crops}, size_crops={self.size_crops}, "
            f"min_scale_crops={self.min_scale_crops}, max_scale_crops={self.max_scale_crops}, "
            f"color_jitter_strength={self.color_jitter_strength}, "
            f"color_jitter_p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}, blur_radius={list(self.blur_radius)}, "
            f"flip_p={self.flip_p}, mean={list(self.mean)}, std={list(self.std)}, "
            f"ratio={list(self.ratio)}, normalize={self.normalize})"
        )


# VISSL: a transform in _TRANSFORMS_WITH_COPIES has its output list flattened
# into the sample and label/data_valid/data_idx replicated per copy.  The list
# object is shared with DEFAULT_TRANSFORM_TYPES, so appending is enough.
if TRANSFORM_NAME not in _vissl_wrapper._TRANSFORMS_WITH_COPIES:
    _vissl_wrapper._TRANSFORMS_WITH_COPIES.append(TRANSFORM_NAME)


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
