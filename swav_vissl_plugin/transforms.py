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
jitter factor ranges and random order, same PIL operations); the
implementation is faster:

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
* colour jitter, grayscale and blur run on the small resized crop;
  brightness/contrast/saturation are the PIL ``ImageEnhance`` blends that
  torchvision uses, called directly; the hue shift (PIL's HSV round trip,
  the costliest step) is a table-driven NumPy version that is bit-exact with
  torchvision's ``adjust_hue`` and 2-3x faster;
* grayscale crops stay single-channel ``L`` images until tensor conversion
  (then broadcast to 3 channels);
* ToTensor + Normalize is one fused ``x * 1/(255 std) - mean/std`` (NumPy,
  float32) over all crops of the same config entry at once.

Importing this module also appends ``"SwavPluginMultiCrop"`` to VISSL's
``_TRANSFORMS_WITH_COPIES`` (so ``SSLTransformsWrapper`` flattens the crop
list and replicates ``label``/``data_valid``/``data_idx`` per crop) and
registers the collator ``"swav_plugin_multicrop_collator"``, whose output has
exactly the structure, shapes and dtypes of VISSL's ``multicrop_collator``.
"""

import math
import numbers
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from classy_vision.dataset.transforms import register_transform
from classy_vision.dataset.transforms.classy_transform import ClassyTransform
from PIL import Image, ImageFilter
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


def _resized_crop(source: torch.Tensor, p: CropParams) -> np.ndarray:
    """Crop ``p``'s box of ``source`` (``(H, W, 3)`` uint8) and resize it to
    ``p.size`` square, bilinear with antialiasing (flipped if ``p.flip``):
    ``(size, size, 3)`` uint8.

    torchvision's ``RandomResizedCrop`` on a PIL image is PIL's crop then
    ``resize(BILINEAR)`` (a triangle filter widened by the downscaling factor,
    edge pixels replicated at the box border); torch's uint8
    ``interpolate(mode="bilinear", antialias=True)`` implements the same
    filter (ported from Pillow) with SIMD kernels for channels-last RGB, about
    twice as fast; its values differ from PIL's by at most 1 (fixed-point
    rounding; tests/test_transforms.py checks it). A box already of the
    output size is copied as it is."""
    box = source[p.top : p.top + p.height, p.left : p.left + p.width]
    if p.height == p.size and p.width == p.size:
        out = box.clone()  # never hand out a view of the (read-only) source
    else:
        x = box.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(
            x, size=(p.size, p.size), mode="bilinear", antialias=True, align_corners=False
        )[0].permute(1, 2, 0)
    if p.flip:
        out = out.flip(1)
    return np.ascontiguousarray(out.numpy())


def _adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    # == PIL ImageEnhance.Brightness (torchvision's PIL adjust_brightness)
    return Image.blend(Image.new("RGB", img.size, 0), img, factor)


_LEVELS = np.arange(256, dtype=np.float64)


def _adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    # == PIL ImageEnhance.Contrast: blend with the rounded mean grey level
    # (the mean of the "L" histogram, as ImageStat computes it: an exact
    # integer sum divided in float64)
    hist = np.asarray(img.convert("L").histogram(), dtype=np.float64)
    mean = int(float(hist @ _LEVELS) / (img.size[0] * img.size[1]) + 0.5)
    return Image.blend(Image.new("RGB", img.size, (mean, mean, mean)), img, factor)


def _adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    # == PIL ImageEnhance.Color: blend with the grey version
    return Image.blend(img.convert("L").convert("RGB"), img, factor)


def _build_hue_tables():
    """Lookup tables that make :func:`_hue_shift` bit-exact with PIL's
    ``convert("HSV")`` / ``convert("RGB")`` round trip (Pillow's Convert.c).

    * hue byte of an RGB pixel: a function of ``(r - g, g - b)``; the table is
      filled by PIL itself from one representative pixel per pair;
    * saturation byte: a function of ``(max - min, max)``, filled by PIL;
    * HSV -> RGB: the output is a permutation (by hue sector) of ``v``,
      ``p = round(v (1 - fs))`` and ``m = round(v X[h, s])`` where ``X`` is
      ``1 - fs f`` (float32 product, odd sectors) or ``1 - fs (1 - f)``
      (double, even sectors), ``f``/``fs`` float32 as in Pillow's C code.
    Checked exhaustively against PIL over all 2**24 colours when written;
    tests/test_transforms.py re-checks a colour grid for every hue shift.
    """
    d1, d2 = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    r, g, b = d1, np.zeros_like(d1), -d2
    low = np.minimum(np.minimum(r, g), b)
    r, g, b = r - low, g - low, b - low
    fits = np.maximum(np.maximum(r, g), b) <= 255
    pix = np.stack([np.where(fits, c, 0) for c in (r, g, b)], -1).astype(np.uint8)
    hue_of_diffs = np.asarray(Image.fromarray(pix).convert("HSV"))[..., 0].ravel().copy()

    chroma, vmax = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    low = np.where(chroma <= vmax, vmax - chroma, 0)
    pix = np.stack([vmax, low, low], -1).astype(np.uint8)
    sat_of_chroma_max = np.asarray(Image.fromarray(pix).convert("HSV"))[..., 1].ravel().copy()

    hf = np.arange(256, dtype=np.float64) * 6.0 / 255.0
    sector = np.floor(hf)
    f = (hf - sector).astype(np.float32)
    odd = (sector.astype(np.int64) % 6) % 2 == 1
    fs = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    x_q = 1.0 - (fs[None, :] * f[:, None]).astype(np.float64)
    x_t = 1.0 - fs[None, :].astype(np.float64) * (1.0 - f[:, None].astype(np.float64))
    x_m = np.where(odd[:, None], x_q, x_t).ravel()  # index h * 256 + s
    y = (1.0 - fs.astype(np.float64))[:, None] * np.arange(256)[None, :]
    p_of_sv = (y + 0.5).astype(np.uint8).ravel()  # index s * 256 + v
    return hue_of_diffs, sat_of_chroma_max, x_m, p_of_sv


_HUE_OF_DIFFS, _SAT_OF_CHROMA_MAX, _X_M, _P_OF_SV = _build_hue_tables()


def _hue_shift(arr: np.ndarray, shift) -> np.ndarray:
    """(..., 3) uint8 RGB -> same, hue byte shifted by ``shift`` (mod 256)
    through HSV exactly as PIL computes it, ~2-3x faster than PIL.

    ``shift``: an int, or a uint8 array with one shift per pixel (several
    crops with different shifts converted in one call)."""
    u8 = np.uint8
    n = arr.size // 3
    planes = np.ascontiguousarray(arr.reshape(n, 3).T)
    r, g, b = planes[0], planes[1], planes[2]
    # RGB -> HSV
    gi = g.astype(np.int32)
    idx = r.astype(np.int32)
    idx -= gi
    idx *= 511
    idx += gi
    idx -= b
    idx += 255 * 511 + 255
    h = _HUE_OF_DIFFS.take(idx)
    v = np.maximum(np.maximum(r, g), b)
    chroma = np.minimum(np.minimum(r, g), b)
    np.subtract(v, chroma, out=chroma)
    idx = chroma.astype(np.int32)
    idx <<= 8
    idx += v
    s = _SAT_OF_CHROMA_MAX.take(idx)
    # shift (wraps around, as torchvision's uint8 addition)
    if isinstance(shift, np.ndarray):
        h += shift.astype(u8, copy=False).reshape(-1)
    else:
        h += u8(int(shift) % 256)
    # HSV -> RGB
    idx = h.astype(np.int32)
    idx <<= 8
    idx += s
    y = _X_M.take(idx)
    y *= v
    y += 0.5
    m = y.astype(u8)  # == C round() for every (h, s, v)
    np.left_shift(s.astype(np.int32), 8, out=idx)
    idx += v
    p = _P_OF_SV.take(idx)
    # sector = floor(6 h / 255) mod 6; per channel pick v, m or p
    a43, a85, a128 = h >= 43, h >= 85, h >= 128
    a170, a213, e255 = h >= 170, h >= 213, h == 255
    n43 = ~a43
    picks = (
        (n43 | a213, (a43 ^ a85) | (a170 ^ a213)),  # R: v in sectors 0,5; m in 1,4
        (a43 ^ a128, n43 | (a128 ^ a170) | e255),  # G: v in 1,2; m in 0,3
        (a128 ^ a213, (a85 ^ a128) | (a213 ^ e255)),  # B: v in 3,4; m in 2,5
    )
    dv = v - p  # uint8 wrap-around: p + [v?](v - p) + [m?](m - p) is exact
    dm = m - p
    out = np.empty((n, 3), u8)
    for c, (is_v, is_m) in enumerate(picks):
        o = dv * is_v.view(u8)
        o += dm * is_m.view(u8)
        np.add(o, p, out=out[:, c])
    return out.reshape(arr.shape)


def _adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    # == torchvision's PIL adjust_hue: HSV round trip with the hue byte
    # shifted by trunc(hue * 255) modulo 256 (the round trip is always made).
    return Image.fromarray(_hue_shift(np.asarray(img), int(hue * 255) % 256))


_JITTER_FNS = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)

# ---- the same operations on uint8 NumPy arrays (what __call__ uses) ---------
# Bit-exact with the PIL functions above (tests/test_transforms.py compares
# them with torchvision's on random images and factors):
# * PIL's Image.blend(a, b, alpha) computes, per byte and in float32,
#   ``t = a + alpha * (b - a)`` (two roundings), then 0 if t <= 0, 255 if
#   t >= 255, else trunc(t). Against a constant image (black for brightness,
#   the mean grey level for contrast) that is a 256-entry lookup table.
# * PIL's RGB -> L is ``(19595 r + 38470 g + 7471 b + 0x8000) >> 16``; the
#   products and sums stay below 2**24, so a float32 matrix-vector product
#   computes them exactly.
_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], dtype=np.float32)
_LEVELS_F32 = np.arange(256, dtype=np.float32)


def _luma(arr: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) uint8 L, exactly PIL's ``convert("L")``."""
    flat = arr.reshape(-1, 3).astype(np.float32)
    lum = flat @ _LUMA_WEIGHTS
    lum += np.float32(0x8000)
    lum *= np.float32(1.0 / 65536.0)
    return np.floor(lum, out=lum).astype(np.uint8).reshape(arr.shape[:-1])


def _blend_lut(base: int, factor: float) -> np.ndarray:
    """Table of PIL's ``Image.blend(constant base, image, factor)`` per byte."""
    b = np.float32(base)
    t = _LEVELS_F32 - b
    t *= np.float32(factor)
    t += b
    return np.clip(t, 0.0, 255.0, out=t).astype(np.uint8)


def _np_brightness(arr: np.ndarray, factor: float) -> np.ndarray:
    return _blend_lut(0, factor).take(arr)


def _np_contrast(arr: np.ndarray, factor: float) -> np.ndarray:
    lum = _luma(arr)
    mean = int(float(lum.sum(dtype=np.int64)) / lum.size + 0.5)
    return _blend_lut(mean, factor).take(arr)


def _np_saturation(arr: np.ndarray, factor: float) -> np.ndarray:
    lum = _luma(arr).astype(np.float32)[..., None]
    t = arr.astype(np.float32)
    t -= lum
    t *= np.float32(factor)
    t += lum
    return np.clip(t, 0.0, 255.0, out=t).astype(np.uint8)


_NP_JITTER_FNS = (_np_brightness, _np_contrast, _np_saturation)
_HUE = 3  # index of the hue adjustment in JitterParams.order


def _hue_shift_many(arrays: List[np.ndarray], shifts: List[int]) -> List[np.ndarray]:
    """:func:`_hue_shift` of several crops (each its own shift) in one call:
    the conversion is per pixel, so the crops' pixels are concatenated."""
    if len(arrays) == 1:
        return [_hue_shift(arrays[0], shifts[0])]
    sizes = [a.shape[0] * a.shape[1] for a in arrays]
    flat = np.concatenate([a.reshape(-1, 3) for a in arrays])
    per_pixel = np.repeat(np.asarray([s % 256 for s in shifts], dtype=np.uint8), sizes)
    out = _hue_shift(flat, per_pixel)
    pieces = np.split(out, np.cumsum(sizes)[:-1])
    return [piece.reshape(a.shape) for piece, a in zip(pieces, arrays)]


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
        self._scale = (1.0 / (255.0 * std_t)).float().numpy()
        self._shift = (-mean_t / std_t).float().numpy()

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
    def apply_params(
        self, img: Image.Image, p: CropParams, source: Optional[torch.Tensor] = None
    ) -> Image.Image:
        """Render one crop of an RGB image as a PIL image (``RGB``, or ``L``
        when grayscale was drawn), before ToTensor/Normalize.

        ``source``: ``img`` as an ``(H, W, 3)`` uint8 tensor, when the caller
        has it already."""
        if source is None:
            source = _as_uint8_tensor(to_rgb(img))
        return self.render(source, [p])[0]

    def render(self, source: torch.Tensor, params: Sequence[CropParams]) -> List[Image.Image]:
        """Render crops of one image (``source``: ``(H, W, 3)`` uint8) as PIL
        images (``RGB``, or ``L`` when grayscale was drawn).

        Per crop, in the recipe's order: resized crop (and flip), colour
        jitter (its four adjustments in the crop's random order), grayscale,
        blur. The jitter is scheduled step by step across crops, so that the
        hue shifts of all crops that are at the same step (the costliest
        adjustment) are converted in one vectorised NumPy call
        (:func:`_hue_shift_many`); each crop still gets exactly its own
        adjustments in its own order. Brightness, contrast, saturation,
        grayscale and blur are PIL's operations, as torchvision calls them."""
        crops = [Image.fromarray(_resized_crop(source, p)) for p in params]
        jittered = [k for k, p in enumerate(params) if p.jitter is not None]
        steps = max((len(params[k].jitter.order) for k in jittered), default=0)
        for step in range(steps):
            hue_crops = []
            for k in jittered:
                jitter = params[k].jitter
                op = jitter.order[step]
                if op == _HUE:
                    hue_crops.append(k)
                else:
                    crops[k] = _JITTER_FNS[op](crops[k], jitter[1 + op])
            if hue_crops:
                shifts = [int(params[k].jitter.hue * 255) % 256 for k in hue_crops]
                shifted = _hue_shift_many([np.asarray(crops[k]) for k in hue_crops], shifts)
                for k, arr in zip(hue_crops, shifted):
                    crops[k] = Image.fromarray(arr)
        for k, p in enumerate(params):
            if p.grayscale:
                crops[k] = crops[k].convert("L")  # broadcast to 3 equal channels later
            if p.blur_radius is not None:
                crops[k] = crops[k].filter(ImageFilter.GaussianBlur(radius=p.blur_radius))
        return crops

    def _to_tensors(self, crops: List[Image.Image], size: int) -> List[torch.Tensor]:
        buf = np.empty((len(crops), size, size, 3), dtype=np.uint8)
        for k, crop in enumerate(crops):
            arr = np.asarray(crop)
            buf[k] = arr if arr.ndim == 3 else arr[:, :, None]
        # uint8 NHWC -> float32 NCHW in one pass.  NumPy (single-threaded)
        # rather than torch ops: tiny tensors, no intra-op thread overhead.
        out = buf.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        if self.normalize:
            # fused ToTensor + Normalize: (x / 255 - mean) / std == x * scale + shift
            out *= self._scale
            out += self._shift
        else:
            out /= np.float32(255.0)  # exactly ToTensor
        return list(torch.from_numpy(out).unbind(0))

    def __call__(self, image: Image.Image) -> List[torch.Tensor]:
        img = to_rgb(image)
        # The data source's per-sample stream (sample_seed.py), else torch's RNG.
        params = self.sample_params(*img.size, generator=sample_seed.take_generator())
        source = _as_uint8_tensor(img)  # one decoded copy for all crops
        arrays = self.render(source, params)
        outputs: List[torch.Tensor] = []
        start = 0
        for n, size in zip(self.nmb_crops, self.size_crops):
            outputs.extend(self._to_tensors(arrays[start : start + n], size))
            start += n
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
