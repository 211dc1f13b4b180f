"""The colour jitter and grayscale of the multi-crop transform
(``transforms.py``) as compiled loops, one call per crop.

What is computed
----------------
For one crop, already resized, flipped and written planar as float32 8-bit
levels, the recipe line "augmentation per crop" up to the blur::

    RandomApply(ColorJitter(0.8,0.8,0.8,0.2), p=0.8), RandomGrayscale(0.2)

Each adjustment is what torchvision's PIL functions compute on the 8-bit
image, level for level: the same definitions as the NumPy operations of
``transforms.py`` (which document them; tests/test_transforms.py compares
both with torchvision on every hue shift, random factors and every order):

* brightness, contrast, saturation: PIL's ``Image.blend(a, x, f)`` in
  float32, ``t = a + f (x - a)``, stored as 0 if ``t <= 0``, 255 if ``t >=
  255``, else ``trunc(t)``; ``a`` is 0, the crop's rounded mean grey level,
  or the pixel's own grey level;
* grey level: PIL's ``(19595 r + 38470 g + 7471 b + 0x8000) >> 16``;
* hue: PIL's HSV round trip with the hue byte shifted modulo 256. The hue
  byte is computed as Pillow's C code computes it (float and double
  operations in its order, so exactly its value, where exact arithmetic
  differs on 0.2 % of the colours); the saturation byte is ``floor(255
  chroma / max)``; HSV -> RGB is the closed form of ``transforms._hue_``.

Each adjustment is one loop over the crop's pixels (the contrast two: its
mean grey level, then the blend), written without branches so that LLVM
vectorises it; the NumPy form makes 3-25 array passes and library calls
per adjustment. No fast-math: every float operation rounds as in the NumPy
form and in Pillow.

Importing this module imports Numba; the transform does so when it is
built (``transforms._colour_kernel``), and calls the kernel once there, so
that loader workers forked later inherit the compiled code. The functions
are compiled on their first call (about 2 s after an install) and cached
next to this file (or in Numba's user cache where that is not writable);
other processes load them from there (about 0.9 s of CPU, mostly Numba's
own initialisation). Without Numba, or with
``SWAV_PLUGIN_COLOUR_KERNEL=numpy`` in the environment, the transform uses
its NumPy operations, which compute the same levels.
"""

from typing import Sequence

import numba
import numpy as np

# The constants are this module's own, not imported from transforms.py:
# Numba freezes globals into the compiled code, and its disk cache is keyed
# on this file alone.
_f32, _f64 = np.float32, np.float64
_ZERO, _HALF, _F255, _F510, _TINY = _f32(0.0), _f32(0.5), _f32(255.0), _f32(510.0), _f32(1e-30)
_INV_65025 = _f32(1.0 / 65025.0)
# PIL's grey-level weights divided by 2**16: exact in float32, every partial
# sum a multiple of 2**-16 below 256, so any summation order is exact and
# floor(sum + 1/2) is PIL's (19595 r + 38470 g + 7471 b + 0x8000) >> 16
_WR, _WG, _WB = _f32(19595.0 / 65536.0), _f32(38470.0 / 65536.0), _f32(7471.0 / 65536.0)


def _jit(fn):
    # error_model="numpy": a float division by zero gives inf instead of a
    # check per element, which would keep the loops from vectorising; no
    # fastmath: every float operation is rounded as the NumPy form rounds it
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # no writable cache location: compile per process
        return numba.njit(nogil=True, error_model="numpy")(fn)


@_jit
def _blend(a, x, f):
    """PIL's ``Image.blend(a, x, f)`` of one level, float32: 0 if ``t <= 0``,
    255 if ``t >= 255``, else ``trunc(t)``, written without branches so that
    the loops vectorise."""
    t = a + f * (x - a)
    t = t if t > _ZERO else _ZERO
    t = t if t < _F255 else _F255
    return np.floor(t)


@_jit
def _grey(r, g, b):
    """PIL's ``convert("L")`` level of one pixel."""
    return np.floor(r * _WR + g * _WG + b * _WB + _HALF)


@_jit
def _brightness(r, g, b, f):
    """``ImageEnhance.Brightness``: blend with black."""
    for i in range(r.shape[0]):
        r[i] = _blend(_ZERO, r[i], f)
        g[i] = _blend(_ZERO, g[i], f)
        b[i] = _blend(_ZERO, b[i], f)


@_jit
def _contrast(r, g, b, f):
    """``ImageEnhance.Contrast``: blend with ``int(mean + 0.5)`` of the
    crop's grey levels."""
    n = r.shape[0]
    total = 0  # integer levels: an exact sum, and one that vectorises
    for i in range(n):
        total += int(_grey(r[i], g[i], b[i]))
    m = _f32(int(total / n + 0.5))
    for i in range(n):
        r[i] = _blend(m, r[i], f)
        g[i] = _blend(m, g[i], f)
        b[i] = _blend(m, b[i], f)


@_jit
def _saturation(r, g, b, f):
    """``ImageEnhance.Color``: blend with the pixel's own grey level."""
    for i in range(r.shape[0]):
        L = _grey(r[i], g[i], b[i])
        r[i] = _blend(L, r[i], f)
        g[i] = _blend(L, g[i], f)
        b[i] = _blend(L, b[i], f)


@_jit
def _ramp(h6, c):
    """``|6 h' - c|`` clipped to [255, 510]: a channel's position on PIL's
    hue ramp is ``510 -`` this (R, ``c`` = 765) or this ``- 255`` (G, B,
    ``c`` = 510, 1020); see ``transforms._hue_``."""
    k = abs(h6 - c)
    k = k if k > _F255 else _F255
    return k if k < _F510 else _F510


@_jit
def _hue_byte(R, G, B, v, lo):
    """Pillow's hue byte (``rgb2hsv_row`` in Convert.c) as C evaluates it:
    float variables and double literals, so ``2.0 + rc - bc``, ``h / 6.0 +
    1.0`` and ``h * 255.0`` are double expressions stored back in float;
    ``fmod(x, 1.0)`` for x in [5/6, 11/6] is ``x - 1`` (exact) or ``x``.
    Equal to Pillow's for every colour (tests/test_transforms.py)."""
    cr = v - lo
    rc = (v - R) / cr
    gc = (v - G) / cr
    bc = (v - B) / cr
    h = bc - gc
    if R != v:
        h = _f32(2.0 + _f64(rc) - _f64(bc)) if G == v else _f32(4.0 + _f64(gc) - _f64(rc))
    x = _f64(h) / 6.0 + 1.0
    x = x - 1.0 if x >= 1.0 else x
    u = _f32(np.floor(_f64(_f32(x)) * 255.0))
    return _ZERO if cr == _ZERO else u


@_jit
def _hue(r, g, b, shift):
    """torchvision's PIL ``adjust_hue``: the HSV round trip with the hue
    byte shifted by ``shift`` modulo 256. HSV -> RGB is the closed form of
    ``transforms._hue_``: each channel ``v - rint(X_n (v s / 65025))``,
    rounded in float32 as there."""
    for i in range(r.shape[0]):
        R, G, B = r[i], g[i], b[i]
        v = R if R > G else G
        v = v if v > B else B
        lo = R if R < G else G
        lo = lo if lo < B else B
        h = _hue_byte(R, G, B, v, lo) + shift
        h = h - _f32(256.0) if h >= _f32(256.0) else h
        s = np.floor((v - lo) * _F255 / (v + _TINY))  # saturation byte, exact
        w = (v * s) * _INV_65025
        H = _f32(6.0) * h
        r[i] = v - np.rint((_F510 - _ramp(H, _f32(765.0))) * w)
        g[i] = v - np.rint((_ramp(H, _F510) - _F255) * w)
        b[i] = v - np.rint((_ramp(H, _f32(1020.0)) - _F255) * w)


@_jit
def _grayscale(r, g, b):
    """``RandomGrayscale``: the grey level on all three channels."""
    for i in range(r.shape[0]):
        L = _grey(r[i], g[i], b[i])
        r[i] = L
        g[i] = L
        b[i] = L


@_jit
def colour_crop_(X, order, factors, shift, gray):
    """Apply one crop's colour jitter, then grayscale, to ``X``, ``(3, P)``
    float32 levels, in place. ``order``: int64 codes of the adjustments in
    the crop's order (0 brightness, 1 contrast, 2 saturation, 3 hue; empty
    for no jitter); ``factors``: float32 brightness, contrast and saturation
    factors; ``shift``: the hue byte shift (0-255); ``gray``: whether to
    convert to grey last."""
    r, g, b = X[0], X[1], X[2]
    for j in range(order.shape[0]):
        op = order[j]
        if op == 0:
            _brightness(r, g, b, factors[0])
        elif op == 1:
            _contrast(r, g, b, factors[1])
        elif op == 2:
            _saturation(r, g, b, factors[2])
        else:
            _hue(r, g, b, _f32(shift))
    if gray:
        _grayscale(r, g, b)


def colour_crop(X: np.ndarray, order: Sequence[int], factors: Sequence[float], shift: int, gray: bool) -> None:
    """:func:`colour_crop_` with the arguments converted (what the transform
    calls): ``order`` and ``factors`` any sequences (``factors`` may hold the
    hue as a fourth value, ignored)."""
    colour_crop_(X, np.asarray(order, dtype=np.int64), np.asarray(factors[:3], dtype=np.float32), int(shift), bool(gray))
