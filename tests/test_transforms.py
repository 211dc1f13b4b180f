"""Tests for swav_vissl_plugin.transforms (SwavPluginMultiCrop + collator).

Statistical tests use fixed torch seeds and tolerances of 4.5 binomial (or
sample-mean) standard errors, so they are deterministic, pass for the recipe
probabilities and fail when a probability is changed by >= 0.2 (e.g. flip
0.5 -> 0.3).  Images and crops are tiny to keep the file fast.

The reference for the augmentations is torchvision's chain as the recipe
writes it (RandomResizedCrop, RandomHorizontalFlip, ColorJitter in
RandomApply, RandomGrayscale, PIL GaussianBlur): its samplers for the
two-sample tests of the random parameters, its PIL functions for the values.
Every colour operation and the flip must equal torchvision's level for level;
the resize may differ by 1 level (fixed-point rounding of torch's kernel) and
the blur by 3 (PIL rounds after each of its six box passes, the plugin once
after the composed passes; see the blur tests).
"""

import functools
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
import torchvision.transforms as TT
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop, ToTensor

import swav_vissl_plugin  # noqa: F401  (registers everything)
from swav_vissl_plugin import colour_kernel
from swav_vissl_plugin import transforms as T
from vissl.data.collators import COLLATOR_REGISTRY, get_collator
from vissl.data.collators.multicrop_collator import multicrop_collator
from vissl.data.ssl_transforms import get_transform
from vissl.data.ssl_transforms import ssl_transforms_wrapper as vissl_wrapper
from tolerances import EPS32, rtol

RECIPE_MEAN = (0.485, 0.456, 0.406)
RECIPE_STD = (0.228, 0.224, 0.225)
Z = 4.5  # standard errors allowed


def make(**overrides):
    cfg = {
        "nmb_crops": [2, 6],
        "size_crops": [224, 96],
        "min_scale_crops": [0.14, 0.05],
        "max_scale_crops": [1.0, 0.14],
    }
    cfg.update(overrides)
    return T.SwavPluginMultiCrop.from_config(cfg)


def rgb_noise(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def full_image(n, size, **overrides):
    """n crops covering the whole (square, size x size) image: identity box."""
    return make(
        nmb_crops=[n],
        size_crops=[size],
        min_scale_crops=[1.0],
        max_scale_crops=[1.0],
        ratio=[1.0, 1.0],
        **overrides,
    )


def to_uint8(t):
    """Undo ToTensor (normalize=False output) exactly."""
    return (t * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


def assert_rate(hits, n, p):
    se = math.sqrt(p * (1 - p) / n)
    rate = hits / n
    assert abs(rate - p) <= Z * se, f"rate {rate:.3f} vs expected {p} (se {se:.3f})"


# --------------------------------------------------------------- output shape
def test_output_count_order_shapes_dtype_recipe_row1():
    torch.manual_seed(0)
    out = make()(rgb_noise(180, 240))
    assert len(out) == 8
    assert [tuple(t.shape) for t in out] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(t.dtype == torch.float32 for t in out)
    assert all(t.is_contiguous() for t in out)


def test_small_sizes_grayscale_input_order():
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "L")
    torch.manual_seed(1)
    out = make(
        nmb_crops=[2, 4],
        size_crops=[28, 14],
        min_scale_crops=[0.14, 0.05],
        max_scale_crops=[1.0, 0.14],
    )(img)
    assert [tuple(t.shape) for t in out] == [(3, 28, 28)] * 2 + [(3, 14, 14)] * 4
    assert all(t.dtype == torch.float32 for t in out)


def test_order_follows_config_lists_not_sorted_by_size():
    torch.manual_seed(2)
    out = make(
        nmb_crops=[1, 2, 1],
        size_crops=[8, 16, 4],
        min_scale_crops=[0.5, 0.5, 0.5],
        max_scale_crops=[1.0, 1.0, 1.0],
    )(rgb_noise(20, 20))
    assert [t.shape[-1] for t in out] == [8, 16, 16, 4]


@pytest.mark.parametrize(
    "mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA", "La", "I", "F", "YCbCr"]
)
def test_image_modes_give_three_channels(mode):
    base = rgb_noise(24, 24)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
    elif mode == "La":
        img = base.convert("LA").convert("La")
    else:
        img = base.convert(mode)
    assert img.mode == mode
    torch.manual_seed(3)
    out = make(nmb_crops=[1, 2], size_crops=[16, 8])(img)
    assert [tuple(t.shape) for t in out] == [(3, 16, 16), (3, 8, 8), (3, 8, 8)]
    assert all(torch.isfinite(t).all() for t in out)


def test_16bit_image_is_rescaled_not_clipped():
    # value 257 * 100 in 16 bits is grey level 100 in 8 bits (PIL would clip to 255)
    img = Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16))
    assert img.mode == "I;16"
    assert np.asarray(T.to_rgb(img)).max() == 100
    tr = full_image(1, 8, color_jitter_p=0.0, grayscale_p=0.0, normalize=False)
    torch.manual_seed(0)
    (out,) = tr(img)
    # grey level 100 / 255 in float32 on either side (2 roundings)
    torch.testing.assert_close(out, torch.full_like(out, 100 / 255), rtol=rtol(2), atol=0)


def test_image_smaller_than_crop_size():
    torch.manual_seed(4)
    out = make(nmb_crops=[2, 2], size_crops=[32, 16])(rgb_noise(5, 3))
    assert [tuple(t.shape) for t in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    torch.manual_seed(4)
    out = make(nmb_crops=[1], size_crops=[4], min_scale_crops=[0.05], max_scale_crops=[0.1])(
        rgb_noise(1, 1)
    )
    assert tuple(out[0].shape) == (3, 4, 4)


def test_rejects_non_pil_input():
    with pytest.raises(TypeError, match="PIL"):
        make()(np.zeros((8, 8, 3), dtype=np.uint8))


# ------------------------------------------------------- VISSL integration
VISSL_CFG = {
    "name": "SwavPluginMultiCrop",
    "nmb_crops": [2, 3],
    "size_crops": [16, 8],
    "min_scale_crops": [0.14, 0.05],
    "max_scale_crops": [1.0, 0.14],
}


def vissl_sample(idx, label):
    return {
        "data": [rgb_noise(20 + idx, 24, seed=idx)],
        "label": [label],
        "data_valid": [1 if idx % 2 == 0 else -1],
        "data_idx": [idx],
    }


def test_registered_in_vissl_registries_and_copies_list():
    assert vissl_wrapper._TRANSFORMS_WITH_COPIES.count("SwavPluginMultiCrop") == 1
    assert "SwavPluginMultiCrop" in vissl_wrapper.DEFAULT_TRANSFORM_TYPES["TRANSFORMS_WITH_COPIES"]
    # built-ins untouched
    for name in ("ImgReplicatePil", "ImgPilToPatchesAndImage", "ImgPilToMultiCrop"):
        assert name in vissl_wrapper._TRANSFORMS_WITH_COPIES
    assert COLLATOR_REGISTRY["swav_plugin_multicrop_collator"] is T.swav_plugin_multicrop_collator


def test_vissl_get_transform_flattens_and_replicates_metadata():
    transform = get_transform([dict(VISSL_CFG)])
    torch.manual_seed(5)
    sample = transform(vissl_sample(7, 42))
    assert len(sample["data"]) == 5
    assert [tuple(t.shape) for t in sample["data"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert sample["label"] == [42] * 5
    assert sample["data_valid"] == [-1] * 5
    assert sample["data_idx"] == [7] * 5
    # a following VISSL transform sees the individual crops (indices 0..4)
    chained = get_transform([dict(VISSL_CFG), {"name": "RandomHorizontalFlip", "p": 1.0}])
    torch.manual_seed(5)
    flipped = chained(vissl_sample(7, 42))
    for a, b in zip(flipped["data"], sample["data"]):
        assert torch.equal(a, b.flip(-1))


def test_collator_matches_vissl_multicrop_collator():
    transform = get_transform([dict(VISSL_CFG)])
    torch.manual_seed(6)
    batch = [transform(vissl_sample(i, 10 * i)) for i in range(4)]
    ours = get_collator("swav_plugin_multicrop_collator", {})(batch)
    ref = multicrop_collator(batch)
    assert set(ours) == set(ref) == {"data", "label", "data_valid", "data_idx"}
    assert len(ours["data"]) == 1 and len(ours["data"][0]) == 5
    assert [tuple(t.shape) for t in ours["data"][0]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    for a, b in zip(ours["data"][0], ref["data"][0]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for key in ("label", "data_valid", "data_idx"):
        assert len(ours[key]) == 1
        assert ours[key][0].shape == ref[key][0].shape == (5 * 4,)
        assert ours[key][0].dtype == ref[key][0].dtype
        assert torch.equal(ours[key][0], ref[key][0])
    # position-major: entry p * B + i is crop p of sample i
    assert ours["data_idx"][0].tolist() == [0, 1, 2, 3] * 5
    assert ours["label"][0].tolist() == [0, 10, 20, 30] * 5


def test_collator_multidimensional_tensor_and_other_label_types():
    transform = get_transform([dict(VISSL_CFG)])
    torch.manual_seed(7)
    batch = [transform(vissl_sample(i, i)) for i in range(3)]
    ours = T.swav_plugin_multicrop_collator(batch, create_multidimensional_tensor=True)
    ref = multicrop_collator(batch, create_multidimensional_tensor=True)
    assert type(ours["data"][0]) is type(ref["data"][0])
    assert torch.equal(ours["data"][0].tensor, ref["data"][0].tensor)
    assert torch.equal(ours["data"][0].mask, ref["data"][0].mask)
    # multi-label lists and numpy labels
    for make_label in (lambda i: [i, i + 1], lambda i: np.int64(i)):
        batch2 = [dict(s, label=[make_label(i)] * 5) for i, s in enumerate(batch)]
        a = T.swav_plugin_multicrop_collator(batch2)["label"][0]
        b = multicrop_collator(batch2)["label"][0]
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_collator_rejects_mismatched_crop_counts():
    transform = get_transform([dict(VISSL_CFG)])
    batch = [transform(vissl_sample(i, i)) for i in range(2)]
    batch[1]["data"] = batch[1]["data"][:3]
    with pytest.raises(ValueError, match="crops"):
        T.swav_plugin_multicrop_collator(batch)


# ------------------------------------------------------ crop-box statistics
def test_crop_box_area_and_aspect_distribution():
    n = 3000
    tr = make(nmb_crops=[n], size_crops=[8], min_scale_crops=[0.05], max_scale_crops=[0.14])
    W, H = 1000, 800
    torch.manual_seed(8)
    params = tr.sample_params(W, H)
    assert len(params) == n
    w = np.array([p.width for p in params], dtype=float)
    h = np.array([p.height for p in params], dtype=float)
    top = np.array([p.top for p in params])
    left = np.array([p.left for p in params])
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    frac = w * h / (W * H)
    # bounds up to integer rounding of w, h
    slack = (w + h + 1) / (W * H)
    assert (frac >= 0.05 - slack).all() and (frac <= 0.14 + slack).all()
    # every box of this range fits: area ~ U(0.05, 0.14)
    sd = (0.14 - 0.05) / math.sqrt(12)
    assert abs(frac.mean() - 0.095) <= Z * sd / math.sqrt(n)
    assert abs(frac.std() - sd) <= 0.1 * sd
    assert frac.min() < 0.053 and frac.max() > 0.137
    # log aspect ~ U(log 3/4, log 4/3)
    la = np.log(w / h)
    lim = math.log(4 / 3)
    assert (np.abs(la) <= lim + 2 / h.min()).all()
    sd = 2 * lim / math.sqrt(12)
    assert abs(la.mean()) <= Z * sd / math.sqrt(n)
    assert abs(la.std() - sd) <= 0.1 * sd
    assert la.min() < -0.9 * lim and la.max() > 0.9 * lim
    # positions uniform over the valid range
    rel = left / (W - w)
    assert abs(rel.mean() - 0.5) <= Z * math.sqrt(1 / 12 / n)
    rel = top / (H - h)
    assert abs(rel.mean() - 0.5) <= Z * math.sqrt(1 / 12 / n)


def test_crop_box_large_scale_range_bounds():
    n = 2000
    tr = make(nmb_crops=[n], size_crops=[8], min_scale_crops=[0.14], max_scale_crops=[1.0])
    torch.manual_seed(9)
    params = tr.sample_params(640, 480)
    w = np.array([p.width for p in params], dtype=float)
    h = np.array([p.height for p in params], dtype=float)
    frac = w * h / (640 * 480)
    assert frac.min() >= 0.14 - 0.01 and frac.max() <= 1.0
    assert frac.min() < 0.16 and frac.max() > 0.9
    # large areas are rejected more often, so the mean is below (0.14+1)/2 but
    # well above the small end
    assert 0.45 < frac.mean() < 0.57


# ------------------------------ against torchvision's samplers (two-sample)
# Deterministic seeds; a two-sample Kolmogorov-Smirnov test must not reject
# equality at p = 1e-4, and proportions must agree within 4.5 standard errors
# of their difference. torchvision draws on torch's global RNG, the plugin on
# its own torch.rand call; the recipe's ranges (scales (0.14, 1) and
# (0.05, 0.14), 500 x 375 images, jitter (0.8, 0.8, 0.8, 0.2)).
KS_P = 1e-4


def assert_same_proportion(k1, n1, k2, n2):
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    assert abs(k1 / n1 - k2 / n2) <= Z * se, (k1 / n1, k2 / n2, se)


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_crop_box_distribution_matches_torchvision(scale):
    n, W, H = 2000, 500, 375
    tr = make(nmb_crops=[n], size_crops=[8], min_scale_crops=[scale[0]], max_scale_crops=[scale[1]])
    torch.manual_seed(20)
    ours = np.array([(p.top, p.left, p.height, p.width) for p in tr.sample_params(W, H)], float)
    torch.manual_seed(21)
    img = Image.new("RGB", (W, H))
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)], float)
    for name, f in (
        ("area", lambda b: b[:, 2] * b[:, 3] / (W * H)),
        ("log aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
        ("top", lambda b: b[:, 0] / np.maximum(H - b[:, 2], 1)),
        ("left", lambda b: b[:, 1] / np.maximum(W - b[:, 3], 1)),
    ):
        a, r = f(ours), f(ref)
        assert ks_2samp(a, r).pvalue > KS_P, name
        assert a.min() >= r.min() - 0.02 * (r.max() - r.min()), name
        assert a.max() <= r.max() + 0.02 * (r.max() - r.min()), name
    # large areas are rejected (fallback-free) alike
    assert_same_proportion(int((ours[:, 2] == H).sum()), n, int((ref[:, 2] == H).sum()), n)


def test_jitter_factors_order_and_blur_radius_match_torchvision():
    n = 3000
    tr = make(nmb_crops=[n], size_crops=[8], min_scale_crops=[0.14], max_scale_crops=[1.0])
    torch.manual_seed(22)
    params = tr.sample_params(64, 64)
    jit = [p.jitter for p in params if p.jitter is not None]
    cj = TT.ColorJitter(0.8, 0.8, 0.8, 0.2)
    torch.manual_seed(23)
    ref = [cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(len(jit))]
    # get_params: (permutation, brightness, contrast, saturation, hue)
    for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        a = np.array([j[1 + i] for j in jit])
        r = np.array([float(x[1 + i]) for x in ref])
        assert ks_2samp(a, r).pvalue > KS_P, name
    for step in range(4):
        for op in range(4):
            k1 = sum(j.order[step] == op for j in jit)
            k2 = sum(int(x[0][step]) == op for x in ref)
            assert_same_proportion(k1, len(jit), k2, len(ref))
    # blur radius: the release draws random.uniform(0.1, 2.0)
    radii = np.array([p.blur_radius for p in params if p.blur_radius is not None])
    rng = random.Random(24)
    assert ks_2samp(radii, [rng.uniform(0.1, 2.0) for _ in range(len(radii))]).pvalue > KS_P


def test_blur_radius_fraction_scales_with_each_crop_size():
    """``blur_radius_fraction``: radius ~ U(lo, hi) x the crop's own size, so
    crops of 28 and 14 px get radii in [0.28, 1.4] and [0.14, 0.7] px, each
    uniform over its range (one random draw per crop, as ``blur_radius``)."""
    n = 3000
    tr = make(nmb_crops=[n, n], size_crops=[28, 14], min_scale_crops=[0.5, 0.2],
              max_scale_crops=[1.0, 0.5], blur_radius_fraction=[0.01, 0.05], blur_p=1.0)
    torch.manual_seed(31)
    params = tr.sample_params(28, 28)
    rng = random.Random(32)
    for size, chunk in ((28, params[:n]), (14, params[n:])):
        radii = np.array([p.blur_radius for p in chunk])
        assert radii.min() >= 0.01 * size and radii.max() <= 0.05 * size
        ref = [rng.uniform(0.01 * size, 0.05 * size) for _ in range(n)]
        assert ks_2samp(radii, ref).pvalue > KS_P, size
    # without it, every crop size draws from the same pixel range
    torch.manual_seed(31)
    plain = make(nmb_crops=[n, n], size_crops=[28, 14], min_scale_crops=[0.5, 0.2],
                 max_scale_crops=[1.0, 0.5], blur_p=1.0).sample_params(28, 28)
    small = np.array([p.blur_radius for p in plain[n:]])
    assert ks_2samp(small, [rng.uniform(0.1, 2.0) for _ in range(n)]).pvalue > KS_P


def test_flip_jitter_grayscale_blur_rates_match_torchvision_ops():
    """Each random operation alone, on tiny images, in the plugin and in
    torchvision's (the release's blur: np.random.rand() <= 0.5): the rates at
    which the outputs change agree."""
    n = 600
    img = rgb_noise(8, 8, seed=9)
    ref_arr = np.asarray(img)
    off = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize=False)
    np.random.seed(25)
    blur = lambda x: x.filter(ImageFilter.GaussianBlur(0.5)) if np.random.rand() <= 0.5 else x  # noqa: E731
    cases = [
        ("flip_p", 0.5, TT.RandomHorizontalFlip(0.5)),
        ("color_jitter_p", 0.8, TT.RandomApply([TT.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8)),
        ("grayscale_p", 0.2, TT.RandomGrayscale(0.2)),
        ("blur_p", 0.5, blur),
    ]
    for k, (key, p, op) in enumerate(cases):
        tr = full_image(n, 8, **dict(off, **{key: p}))
        torch.manual_seed(30 + k)
        ours = sum(not np.array_equal(to_uint8(t), ref_arr) for t in tr(img))
        theirs = sum(not np.array_equal(np.asarray(op(img)), ref_arr) for _ in range(n))
        assert_same_proportion(ours, n, theirs, n)


def test_crop_box_fallback_matches_torchvision():
    # no box with area >= 0.9 and aspect in [3/4, 4/3] fits in 1000 x 10
    tr = make(nmb_crops=[4], size_crops=[8], min_scale_crops=[0.9], max_scale_crops=[1.0])
    img = Image.new("RGB", (1000, 10))
    expected = RandomResizedCrop.get_params(img, [0.9, 1.0], [3 / 4, 4 / 3])
    for p in tr.sample_params(1000, 10):
        assert (p.top, p.left, p.height, p.width) == tuple(expected)


def test_crop_rendered_from_sampled_box():
    # pixel (x, y) has R = x, G = y: the output reveals where the crop came from
    yy, xx = np.mgrid[0:256, 0:256]
    img = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))
    n, s = 200, 32
    tr = make(
        nmb_crops=[n], size_crops=[s], min_scale_crops=[0.08], max_scale_crops=[1.0],
        flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize=False,
    )
    torch.manual_seed(10)
    out = tr(img)
    torch.manual_seed(10)
    params = tr.sample_params(256, 256)
    k1, k2 = 8, 23  # interior output pixels (bilinear keeps a ramp linear)
    for t, p in zip(out, params):
        a = to_uint8(t).astype(float)
        r, g = a[s // 2, :, 0], a[:, s // 2, 1]
        w_est = (r[k2] - r[k1]) / (k2 - k1) * s
        h_est = (g[k2] - g[k1]) / (k2 - k1) * s
        x0 = r[k1] - (k1 + 0.5) * p.width / s + 0.5
        y0 = g[k1] - (k1 + 0.5) * p.height / s + 0.5
        assert abs(w_est - p.width) <= 2.5 and abs(h_est - p.height) <= 2.5
        assert abs(x0 - p.left) <= 1.0 and abs(y0 - p.top) <= 1.0


def test_box_resize_close_to_crop_then_resize():
    img = rgb_noise(64, 64).filter(ImageFilter.GaussianBlur(2))
    tr = full_image(1, 16, flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                    blur_p=0.0, normalize=False)
    p = T.CropParams(16, 10, 5, 40, 30, False, None, False, None)
    ours = np.asarray(tr.apply_params(img, p)).astype(int)
    ref = np.asarray(TF.resized_crop(img, 10, 5, 40, 30, [16, 16])).astype(int)
    assert np.abs(ours - ref)[1:-1, 1:-1].max() <= 1
    assert np.abs(ours - ref).mean() < 1.0


# ------------------------------------------------ per-crop random operations
def test_horizontal_flip_rate():
    n = 500
    img = Image.fromarray(np.tile(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 1, 3)))
    tr = full_image(n, 8)  # jitter/grayscale/blur at recipe values
    torch.manual_seed(11)
    out = torch.stack(tr(img))
    flipped = out[..., :4].sum((1, 2, 3)) > out[..., 4:].sum((1, 2, 3))
    assert_rate(int(flipped.sum()), n, 0.5)


def test_flip_is_mirror_and_disabled_by_zero():
    img = rgb_noise(8, 8)
    ref = np.asarray(img)
    torch.manual_seed(0)
    (a,) = full_image(1, 8, flip_p=1.0, color_jitter_p=0.0, grayscale_p=0.0,
                      blur_p=0.0, normalize=False)(img)
    assert np.array_equal(to_uint8(a), ref[:, ::-1])
    (b,) = full_image(1, 8, flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                      blur_p=0.0, normalize=False)(img)
    assert np.array_equal(to_uint8(b), ref)


def test_color_jitter_rate():
    n = 600
    img = rgb_noise(8, 8, seed=1)
    tr = full_image(n, 8, flip_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize=False)
    torch.manual_seed(12)
    out = tr(img)
    ref = np.asarray(img)
    changed = sum(not np.array_equal(to_uint8(t), ref) for t in out)
    assert_rate(changed, n, 0.8)


def test_color_jitter_factor_ranges_and_order():
    n = 2000
    tr = make(nmb_crops=[n], size_crops=[8], min_scale_crops=[0.14], max_scale_crops=[1.0])
    torch.manual_seed(13)
    jit = [p.jitter for p in tr.sample_params(64, 64) if p.jitter is not None]
    assert_rate(len(jit), n, 0.8)
    f = np.array([[j.brightness, j.contrast, j.saturation, j.hue] for j in jit])
    lo = np.array([0.2, 0.2, 0.2, -0.2])
    hi = np.array([1.8, 1.8, 1.8, 0.2])
    assert (f >= lo).all() and (f <= hi).all()
    m = len(jit)
    assert np.all(np.abs(f.mean(0) - (lo + hi) / 2) <= Z * (hi - lo) / math.sqrt(12 * m))
    assert (f.min(0) < lo + 0.02 * (hi - lo)).all() and (f.max(0) > hi - 0.02 * (hi - lo)).all()
    orders = [j.order for j in jit]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    first = np.bincount([o[0] for o in orders], minlength=4) / m
    assert np.all(np.abs(first - 0.25) <= Z * math.sqrt(0.25 * 0.75 / m))
    assert len(set(orders)) == 24


def test_color_jitter_strength_scales_ranges():
    one = {"min_scale_crops": [0.14], "max_scale_crops": [1.0]}
    tr = make(nmb_crops=[500], size_crops=[8], color_jitter_strength=0.5, **one)
    torch.manual_seed(14)
    f = np.array([[j.brightness, j.hue] for j in
                  (p.jitter for p in tr.sample_params(64, 64)) if j is not None])
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 0].max() > 1.35
    assert np.abs(f[:, 1]).max() <= 0.1 and np.abs(f[:, 1]).max() > 0.095
    tr0 = make(nmb_crops=[50], size_crops=[8], color_jitter_strength=0.0, **one)
    assert all(p.jitter is None for p in tr0.sample_params(64, 64))


def planar(img):
    """RGB PIL image -> (3, H*W) float32 levels, the colour operations' layout."""
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)).reshape(3, -1).astype(np.float32)


def unplanar(X, size):
    return X.reshape(3, size[1], size[0]).transpose(1, 2, 0).astype(np.uint8)


BACKENDS = ["numba", "numpy"]  # the compiled colour kernel, the NumPy operations


def colour_op(backend, op, X, value, ws):
    """Colour adjustment ``op`` (0 brightness, 1 contrast, 2 saturation:
    ``value`` the factor; 3 hue: ``value`` the shift byte; 4 grayscale) on
    the planar crop ``X``, in place, by the NumPy operations or the compiled
    kernel."""
    if backend == "numpy":
        if op == 4:
            T._grayscale_(X, ws)
        elif op == 3:
            T._hue_(X, value, ws)
        else:
            T._JITTER_OPS[op](X, value, ws)
    elif op == 4:
        colour_kernel.colour_crop(X, [], [1.0] * 3, 0, True)
    else:
        colour_kernel.colour_crop(X, [op], [value] * 3, value if op == 3 else 0, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)])
def test_jitter_flip_grayscale_equal_torchvision_ops(order, backend):
    img = rgb_noise(12, 12, seed=3)
    tr = full_image(1, 12)
    tr.use_colour_kernel = backend == "numba"
    j = T.JitterParams(order, 1.37, 0.61, 1.52, -0.13)
    p = T.CropParams(12, 0, 0, 12, 12, True, j, False, None)
    ref = TF.hflip(img)
    fns = [
        lambda x: TF.adjust_brightness(x, j.brightness),
        lambda x: TF.adjust_contrast(x, j.contrast),
        lambda x: TF.adjust_saturation(x, j.saturation),
        lambda x: TF.adjust_hue(x, j.hue),
    ]
    for fn in order:
        ref = fns[fn](ref)
    assert np.array_equal(np.asarray(tr.apply_params(img, p)), np.asarray(ref))
    gray = tr.apply_params(img, p._replace(grayscale=True))
    assert np.array_equal(np.asarray(gray), np.asarray(TF.rgb_to_grayscale(ref, num_output_channels=3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_brightness_contrast_saturation_equal_torchvision_on_random_factors(backend):
    rng = np.random.default_rng(7)
    photo = natural_photo(40, 40)
    for trial in range(30):
        img = photo if trial % 2 else rgb_noise(17, 23, seed=trial)
        ws = T._Workspace(max(img.size))
        factor = float(rng.uniform(0.0, 2.5))
        for op, ref in enumerate((TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)):
            X = planar(img)
            colour_op(backend, op, X, factor, ws)
            assert np.array_equal(unplanar(X, img.size), np.asarray(ref(img, factor))), (op, factor)


@functools.lru_cache(maxsize=1)
def _china():
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")


def natural_photo(h, w, top=120, left=200):
    """A crop of scikit-learn's sample photograph (shipped with its wheel)."""
    return Image.fromarray(np.ascontiguousarray(_china()[top : top + h, left : left + w]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hue_shift_bit_exact_with_torchvision_for_every_shift(backend):
    # colour grid incl. greys, primaries, ties between channels, 0 and 255,
    # plus noise and a photograph
    levels = np.array([0, 1, 2, 15, 42, 43, 85, 127, 128, 170, 212, 213, 250, 254, 255])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    noise = np.random.default_rng(5).integers(0, 256, (75 * 45 - len(grid), 3))
    photo = np.asarray(natural_photo(45, 45)).reshape(-1, 3)
    img = Image.fromarray(np.concatenate([grid, noise, photo]).astype(np.uint8).reshape(120, 45, 3))
    ws = T._Workspace(120)
    for k in range(-127, 128):  # every shift torchvision can produce
        hue = (k + (0.5 if k >= 0 else -0.5)) / 255.0
        hue = min(max(hue, -0.5), 0.5)
        X = planar(img)
        colour_op(backend, 3, X, T._hue_shift_byte(hue), ws)
        assert np.array_equal(unplanar(X, img.size), np.asarray(TF.adjust_hue(img, hue))), f"hue {hue}"


def test_compiled_colour_ops_equal_pil_on_every_colour():
    """All 2**24 colours in one 4096x4096 image: the compiled kernel's hue
    (its hue byte is computed, not looked up) equals torchvision's
    ``adjust_hue`` for shifts across the range, and its saturation and
    grayscale equal PIL's."""
    c = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(4096, 4096, 3)
    img = Image.fromarray(every)
    cases = [(3, T._hue_shift_byte(h), functools.partial(TF.adjust_hue, hue_factor=h))
             for h in (1.5 / 255, 0.4, -0.5)]
    cases += [(2, 1.37, functools.partial(TF.adjust_saturation, saturation_factor=1.37)),
              (4, None, lambda im: im.convert("L").convert("RGB"))]
    for op, value, ref in cases:
        X = planar(img)
        colour_op("numba", op, X, value, None)
        assert np.array_equal(unplanar(X, img.size), np.asarray(ref(img))), (op, value)


# Blur: PIL's GaussianBlur rounds to 8 bits after each of its six box passes;
# the plugin applies the six passes as one linear operator and rounds once.
# On photographs that moves 10-45 % of the levels by 1, a few by 2-3, with no
# bias (mean difference below 0.1 level except at radii whose box weights
# make PIL's own per-pass rounding hit exact halves, e.g. 1.0: -0.5). The
# worst case is pixel noise at radii below ~0.3, where each of PIL's passes
# moves a level by less than 1/2 and its rounding undoes the blur: there the
# mean absolute difference reaches 1 level.
BLUR_MAX_DIFF, BLUR_MEAN_DIFF_PHOTO, BLUR_MEAN_DIFF_NOISE = 3, 0.6, 1.1


@pytest.mark.parametrize("size", [3, 14, 96, 224])  # dense, dense, then windowed products (rendered with margins)
def test_blur_close_to_pil_gaussian_blur(size):
    photo = natural_photo(size, size, top=40, left=60)
    noise = rgb_noise(size, size, seed=size)
    tr = full_image(1, size)
    for radius in (0.1, 0.55, 1.37, 1.99, 4.2, 9.0):  # 9.0: band too wide for blocks
        for img in (photo, noise):
            p = T.CropParams(size, 0, 0, size, size, False, None, False, radius)
            ours = np.asarray(tr.apply_params(img, p)).astype(int)
            ref = np.asarray(img.filter(ImageFilter.GaussianBlur(radius))).astype(int)
            diff = np.abs(ours - ref)
            assert diff.max() <= BLUR_MAX_DIFF, (size, radius, diff.max())
            limit = BLUR_MEAN_DIFF_PHOTO if img is photo else BLUR_MEAN_DIFF_NOISE
            assert diff.mean() <= limit, (size, radius, diff.mean())
            if img is photo and size >= 96:  # no bias (radius 1.0 excepted, see above)
                assert abs((ours - ref).mean()) <= 0.1, (size, radius)


@pytest.mark.parametrize("size", [5, 14, 96, 224])
def test_blur_operator_is_pils_three_box_passes(size):
    """The composed operator equals the product of three single-pass
    matrices written from Pillow's BoxBlur.c: out[i] = (ww * sum_{|d|<=r}
    x[i+d] + fw * (x[i-r-1] + x[i+r+1])) / 2**24, indices clamped."""
    for radius in (0.1, 0.7, 1.0, 1.5, 2.0, 3.3):
        r, ww, fw = T._pil_box_weights(radius)
        assert (2 * r + 1) * ww + 2 * fw in (1 << 24, (1 << 24) - 1)
        K = np.zeros((size, size))
        for i in range(size):
            for d in range(-r - 1, r + 2):
                K[i, min(max(i + d, 0), size - 1)] += (fw if abs(d) == r + 1 else ww) / 2**24
        # the operator's weights (<= 1) rounded once to float32
        np.testing.assert_allclose(T._blur_matrix(size, (r, ww, fw)), K @ K @ K, rtol=0, atol=EPS32)


def _pillow_box_weights_float32(radius):
    """Pillow's _gaussian_blur_radius (3 passes) and ImagingHorizontalBoxBlur
    (BoxBlur.c) transcribed with NumPy float32 scalars: sigma2 = r*r/3,
    L = sqrt(12 sigma2 + 1), l = floor((L - 1) / 2), a = (2l + 1)(l(l + 1) -
    3 sigma2) / (6 (sigma2 - (l + 1)^2)), box radius l + a; ww =
    (1 << 24) / (2 box + 1), fw = ((1 << 24) - (2r + 1) ww) / 2."""
    f = np.float32
    rad = f(radius)
    sigma2 = rad * rad / f(3)
    L = f(math.sqrt(12.0 * float(sigma2) + 1.0))
    l = f(math.floor((float(L) - 1.0) / 2.0))
    a = (f(2) * l + f(1)) * (l * (l + f(1)) - f(3) * sigma2)
    a = a / (f(6) * (sigma2 - (l + f(1)) * (l + f(1))))
    box = l + a
    r = int(box)
    ww = int(f(1 << 24) / (box * f(2) + f(1)))
    return r, ww, ((1 << 24) - (r * 2 + 1) * ww) // 2


def test_box_weights_follow_pillows_float32_arithmetic():
    rng = np.random.default_rng(3)
    radii = np.concatenate([rng.uniform(0.0, 2.0, 3000), rng.uniform(2.0, 12.0, 500),
                            np.linspace(0.1, 2.0, 191)])
    for radius in radii.tolist():
        assert T._pil_box_weights(radius) == _pillow_box_weights_float32(radius), radius


def test_blurred_batch_equals_crops_blurred_one_by_one():
    """The batched dense blur (all crops of a size at once, grey crops on
    one channel) gives each crop exactly what blurring it alone gives."""
    for size, radii in ((96, [0.3, 1.9, 1.2]), (224, [0.7, 9.0, 1.6])):  # 224: banded, 9.0: dense
        x = torch.from_numpy(np.stack([
            planar(natural_photo(size, size, top=10 * k, left=20 * k)).reshape(3, size, size)
            for k in range(len(radii))]))
        tmp = torch.empty(len(radii) * 3 * size * size)
        batch = x.clone()
        T._blur_(batch, radii, tmp)
        for k, radius in enumerate(radii):
            one = x[k : k + 1].clone()
            T._blur_(one, [radius], tmp)
            assert torch.equal(batch[k], one[0]), (size, radius)
        grey = x[:, :1].clone().expand(-1, 3, -1, -1).contiguous()
        T._blur_(grey[:, :1], radii, tmp)  # one channel of each 3-channel crop
        for k in range(len(radii)):
            assert torch.equal(grey[k, 0], batch[k, 0]), (size, radii[k])


def test_blur_windows_over_zero_margins_equal_the_block_products():
    """Render buffers carry zeros around them; there the blur's windows all
    start h samples before their block (one batched product per pass) and
    read the margins with weight zero: the same levels as the clipped
    windows and dense products without margins (the same sums; a level
    may move by one where a sum's rounding order decides a tie)."""
    for size, radii in ((224, [0.7]), (224, [1.8, 0.4]), (96, [0.3, 1.9, 1.2]), (64, [1.0, 2.0])):
        m = len(radii)
        x = torch.from_numpy(np.stack([
            planar(natural_photo(size, size, top=10 * k, left=20 * k)).reshape(3, size, size)
            for k in range(m)]))
        plain = x.clone()
        T._blur_(plain, radii, torch.empty(m * 3 * size * size))
        margin = T._BLUR_MARGIN * size
        padded = T._with_margins(m * 3 * size * size, margin).view(m, 3, size, size)
        padded.copy_(x)
        tmp = T._workspace(size).blur_tmp(m)
        assert T._has_margins(padded, margin) and T._has_margins(tmp[: padded.numel()], margin)
        T._blur_(padded, radii, tmp, margins=True)
        diff = (padded - plain).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (size, radii)
        # the window path was taken: it reads the margins, so garbage there shows
        flat = padded.view(-1)
        base = flat.untyped_storage()
        bad = torch.empty(0).set_(base, 0, (flat.storage_offset(),))  # the margin before
        bad.fill_(float("nan"))
        again = T._with_margins(m * 3 * size * size, margin)  # fresh, zero margins
        again.copy_(x.reshape(-1))
        T._blur_(padded.copy_(x), radii, tmp, margins=True)
        assert torch.isnan(padded).any(), "window path not taken"
        T._blur_(again.view(m, 3, size, size), radii, tmp, margins=True)
        assert not torch.isnan(again).any()
        # grey crops: the first channel of each crop, the crops apart in the buffer
        grey = T._with_margins(m * 3 * size * size, margin).view(m, 3, size, size)
        grey.copy_(x[:, :1].expand(-1, 3, -1, -1))
        grey_plain = grey[:, :1].clone()
        T._blur_(grey_plain, radii, torch.empty(m * size * size))
        T._blur_(grey[:, :1], radii, tmp, margins=True)
        diff = (grey[:, :1] - grey_plain).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (size, radii, "grey")


def test_blur_windows_ignore_what_a_larger_work_buffer_held():
    """The work buffer is kept per crop size and sized for the most crops
    blurred so far: past the crops of a smaller batch it holds whatever it
    held, read (with weight zero) by the last windows."""
    size = 96
    ws = T._workspace(size)
    tmp = ws.blur_tmp(4)
    tmp.fill_(float("nan"))  # any bits: never written there
    x = torch.from_numpy(planar(natural_photo(size, size)).reshape(1, 3, size, size))
    plain = x.clone()
    T._blur_(plain, [1.5], torch.empty(3 * size * size))
    padded = T._with_margins(3 * size * size, T._BLUR_MARGIN * size).view(1, 3, size, size)
    padded.copy_(x)
    T._blur_(padded, [1.5], ws.blur_tmp(1), margins=True)
    assert not torch.isnan(padded).any()
    assert (padded - plain).abs().max() <= 1


def test_grey_blurred_crops_render_like_pil():
    img = natural_photo(96, 96, top=30, left=30)
    tr = full_image(1, 96)
    for radius in (0.4, 1.7):
        p = T.CropParams(96, 0, 0, 96, 96, False, None, True, radius)
        ours = np.asarray(tr.apply_params(img, p)).astype(int)
        ref = np.asarray(TF.rgb_to_grayscale(img, 3).filter(ImageFilter.GaussianBlur(radius))).astype(int)
        assert np.abs(ours - ref).max() <= BLUR_MAX_DIFF
        assert np.abs(ours - ref).mean() <= BLUR_MEAN_DIFF_PHOTO


def test_rgbx_source_view_equals_pixels_and_outlives_the_image():
    img = natural_photo(60, 70)
    ref = np.asarray(img).copy()
    src = T._as_uint8_tensor(img)
    assert src.shape == (60, 70, 4)  # Pillow exports its RGBX memory
    assert np.array_equal(src.numpy()[..., :3], ref)
    del img  # freed here (reference counting); its memory must stay with the view
    [rgb_noise(60, 70, seed=k) for k in range(5)]  # reuse of freed memory would show
    assert np.array_equal(src.numpy()[..., :3], ref)
    # over Pillow's 16 MiB memory block an image is not exported: a copy
    big = Image.new("RGB", (2000, 2100), (7, 8, 9))
    big.paste((200, 100, 50), (5, 2080, 1990, 2090))
    src = T._as_uint8_tensor(big)
    assert src.shape == (2100, 2000, 3)
    assert src[2085, 100].tolist() == [200, 100, 50] and src[5, 5].tolist() == [7, 8, 9]


def test_crops_from_rgbx_view_equal_crops_from_rgb_copy():
    img = natural_photo(80, 90)
    tr = make(nmb_crops=[3, 3], size_crops=[32, 12])
    torch.manual_seed(5)
    params = tr.sample_params(90, 80)
    four = T._as_uint8_tensor(img)
    three = torch.from_numpy(np.asarray(img).copy())
    assert four.shape[2] == 4  # Pillow exports its RGBX memory here
    for a, b in zip(tr.render(four, params), tr.render(three, params)):
        assert np.array_equal(a, b)


def test_dataloader_workers_collate_and_reproducible():
    tr = make(nmb_crops=[2, 2], size_crops=[16, 8])
    imgs = [rgb_noise(20, 24, seed=i) for i in range(4)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"data": tr(imgs[i]), "label": [i] * 4, "data_valid": [1] * 4,
                    "data_idx": [i] * 4}

    def run(seed):
        loader = torch.utils.data.DataLoader(
            DS(), batch_size=2, num_workers=1, collate_fn=T.swav_plugin_multicrop_collator,
            generator=torch.Generator().manual_seed(seed), multiprocessing_context="fork",
        )
        return list(loader)

    a, b, c = run(0), run(0), run(1)
    assert [tuple(t.shape) for t in a[0]["data"][0]] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 2
    assert a[1]["data_idx"][0].tolist() == [2, 3] * 4
    for x, y in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(x["data"][0], y["data"][0]))
    assert not all(torch.equal(s, t) for s, t in zip(a[0]["data"][0], c[0]["data"][0]))


def test_grayscale_rate():
    n = 600
    img = rgb_noise(8, 8, seed=2)
    tr = full_image(n, 8, normalize=False)  # jitter, flip, blur at recipe values
    torch.manual_seed(15)
    out = torch.stack(tr(img))
    gray = ((out[:, 0] == out[:, 1]) & (out[:, 1] == out[:, 2])).flatten(1).all(1)
    assert_rate(int(gray.sum()), n, 0.2)


def test_blur_rate_and_radius():
    n = 500
    img = rgb_noise(16, 16, seed=4)
    tr = full_image(n, 16, flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, normalize=False)
    torch.manual_seed(16)
    out = tr(img)
    torch.manual_seed(16)
    params = tr.sample_params(16, 16)
    ref = np.asarray(img)
    blurred = [not np.array_equal(to_uint8(t), ref) for t in out]
    assert_rate(sum(blurred), n, 0.5)
    radii = []
    for t, p, b in zip(out, params, blurred):
        assert b == (p.blur_radius is not None)
        if b:
            expect = np.asarray(img.filter(ImageFilter.GaussianBlur(p.blur_radius))).astype(int)
            assert np.abs(to_uint8(t).astype(int) - expect).max() <= BLUR_MAX_DIFF
            radii.append(p.blur_radius)
    radii = np.array(radii)
    assert radii.min() >= 0.1 and radii.max() <= 2.0
    sd = 1.9 / math.sqrt(12)
    assert abs(radii.mean() - 1.05) <= Z * sd / math.sqrt(len(radii))
    assert radii.min() < 0.15 and radii.max() > 1.95
    # output-based radius estimate: nearest of a grid of PIL blurs
    grid = np.arange(0.1, 2.0001, 0.05)
    bank = np.stack([np.asarray(img.filter(ImageFilter.GaussianBlur(float(r)))) for r in grid]).astype(int)
    outs = np.stack([to_uint8(t) for t, b in zip(out, blurred) if b]).astype(int)
    est = grid[np.abs(outs[:, None] - bank[None]).sum((2, 3, 4)).argmin(1)]
    assert np.all(np.abs(est - radii) <= 0.051)


def test_normalisation_of_constant_image():
    v = np.array([10, 128, 250], dtype=np.uint8)
    img = Image.fromarray(np.tile(v, (12, 12, 1)))
    tr = make(nmb_crops=[2, 3], size_crops=[8, 4], color_jitter_p=0.0, grayscale_p=0.0)
    assert tr.mean == RECIPE_MEAN and tr.std == RECIPE_STD
    expected = (torch.tensor(v / 255.0) - torch.tensor(RECIPE_MEAN)) / torch.tensor(RECIPE_STD)
    torch.manual_seed(17)
    # float32: / 255, - mean, / std, the expected value's own rounding: 4
    # roundings on values up to 1 / min(std)
    for t in tr(img):
        torch.testing.assert_close(t, expected.float().view(3, 1, 1).expand_as(t), rtol=0, atol=rtol(4) / min(RECIPE_STD))
    custom = full_image(1, 4, color_jitter_p=0.0, grayscale_p=0.0,
                        mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 1.0])
    (t,) = custom(img)
    exp = (torch.tensor(v / 255.0) - 0.5) / torch.tensor([0.5, 0.25, 1.0])
    torch.testing.assert_close(t, exp.float().view(3, 1, 1).expand_as(t), rtol=0, atol=rtol(4) / 0.25)


def test_unnormalised_output_equals_to_tensor():
    img = rgb_noise(8, 8)
    (t,) = full_image(1, 8, flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                      blur_p=0.0, normalize=False)(img)
    assert torch.equal(t, ToTensor()(img))


# ------------------------------------------------------------- determinism
def test_same_seed_same_crops_and_only_torch_rng_used():
    img = rgb_noise(40, 50)
    tr = make(nmb_crops=[2, 4], size_crops=[16, 8])
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    py_state, np_state = random.getstate(), np.random.get_state()
    a = tr(img)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    torch.manual_seed(123)
    random.seed(2)
    np.random.seed(2)
    b = tr(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(124)
    c = tr(img)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"min_scale_crops": [0.14]},
         r"nmb_crops, size_crops, min_scale_crops, max_scale_crops must have the same length, got 2, 2, 1, 2"),
        ({"min_scale_crops": [0.5, 0.05], "max_scale_crops": [0.4, 0.14]}, r"min_scale_crops\[0\].*max_scale_crops\[0\]"),
        ({"min_scale_crops": [0.0, 0.05]}, r"min_scale_crops\[0\] must be in \(0, 1\]"),
        ({"max_scale_crops": [1.0, 1.5]}, r"max_scale_crops\[1\] must be in \(0, 1\]"),
        ({"size_crops": [224, 0]}, r"size_crops\[1\] must be >= 1"),
        ({"nmb_crops": [0, 6]}, r"nmb_crops\[0\] must be >= 1"),
        ({"nmb_crops": [2.5, 6]}, r"nmb_crops must contain integers"),
        ({"flip_p": 1.5}, r"flip_p must be a probability"),
        ({"grayscale_p": -0.1}, r"grayscale_p must be a probability"),
        ({"blur_p": 2}, r"blur_p must be a probability"),
        ({"color_jitter_p": 1.01}, r"color_jitter_p must be a probability"),
        ({"color_jitter_strength": -1}, r"color_jitter_strength"),
        ({"blur_radius": [2.0, 0.1]}, r"blur_radius"),
        ({"blur_radius_fraction": [0.05, 0.01]}, r"blur_radius_fraction must satisfy min <= max"),
        ({"blur_radius_fraction": [-0.1, 0.1]}, r"blur_radius_fraction must be >= 0"),
        ({"blur_radius_fraction": [0.01, 0.05], "blur_radius": [0.1, 2.0]},
         r"blur_radius \(pixels\) or blur_radius_fraction \(of the crop size\), not both"),
        ({"ratio": [0.0, 1.0]}, r"ratio"),
        ({"std": [0.2, 0.0, 0.2]}, r"std"),
        ({"mean": [0.5, 0.5]}, r"mean"),
        ({"nmb_crop": [2, 6]}, r"unknown config key\(s\) nmb_crop"),
        ({"size_crops": 224}, r"size_crops must be a list"),
        ({"mean": "0.5"}, r"mean must be a list"),
    ],
)
def test_config_validation_names_key(overrides, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        make(**overrides)
    assert "SwavPluginMultiCrop" in str(err.value)
    assert "config.DATA" in str(err.value)  # where to fix it


def test_config_missing_key_and_vissl_path():
    with pytest.raises(ValueError, match="missing required key max_scale_crops"):
        T.SwavPluginMultiCrop.from_config(
            {"nmb_crops": [2], "size_crops": [8], "min_scale_crops": [0.1]}
        )
    bad = dict(VISSL_CFG, flip_p=3)
    with pytest.raises(ValueError, match="flip_p"):
        get_transform([bad])
    # the wrapper key `indices` is tolerated by from_config
    T.SwavPluginMultiCrop.from_config(dict(VISSL_CFG, indices=[0]))


def test_defaults_are_recipe_values():
    tr = make()
    assert tr.color_jitter_strength == 1.0 and tr.color_jitter_p == 0.8
    assert tr.grayscale_p == 0.2 and tr.blur_p == 0.5 and tr.flip_p == 0.5
    assert tr.blur_radius == (0.1, 2.0)
    assert tr.ratio == pytest.approx((3 / 4, 4 / 3))
    assert tr.mean == RECIPE_MEAN and tr.std == RECIPE_STD
    assert tr.normalize is True


class _BlasThreadsAfterTransform(torch.utils.data.Dataset):
    """Applies the transform, then reports NumPy's BLAS thread counts."""

    def __init__(self, tr, img):
        self.tr, self.img = tr, img

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from threadpoolctl import threadpool_info

        self.tr(self.img)
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_loader_workers_run_numpy_blas_on_one_thread_main_process_untouched():
    from threadpoolctl import threadpool_info, threadpool_limits

    tr = make(nmb_crops=[1, 1], size_crops=[32, 16])
    img = natural_photo(60, 70)
    with threadpool_limits(2, user_api="blas"):  # as on a 2-core machine, whatever this one has
        ds = _BlasThreadsAfterTransform(tr, img)
        assert ds[0] and set(ds[0]) == {2}  # main process: unchanged
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                             multiprocessing_context="fork")
        assert [set(t) for t in loader] == [{1}, {1}]  # in the worker: one thread
        assert {d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"} == {2}


# ------------------------------------------------ compiled colour kernel: choice
def test_both_colour_backends_render_the_same_crops():
    """The compiled kernel and the NumPy operations (each compared with
    torchvision above) give the same levels through the whole transform:
    recipe crops of a photograph, every jitter order, grayscale and blur."""
    tr = make()
    img = natural_photo(375, 500, top=0, left=0)
    source = T._as_uint8_tensor(img)
    gen = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(12):
        params = tr.sample_params(*img.size, generator=gen)
        orders.update(p.jitter.order for p in params if p.jitter is not None)
        tr.use_colour_kernel = True
        compiled = [c.clone() for c in tr.render_levels(source, params)[1]]
        tr.use_colour_kernel = False
        numpy_ops = tr.render_levels(source, params)[1]
        assert all(torch.equal(a, b) for a, b in zip(compiled, numpy_ops))
    assert len(orders) >= 20  # most of the 24 orders were exercised


@pytest.fixture
def undecided_colour_kernel():
    """Forget this process's choice of colour backend for the test."""
    saved = list(T._COLOUR_KERNEL)
    T._COLOUR_KERNEL.clear()
    yield
    T._COLOUR_KERNEL[:] = saved


def test_colour_kernel_compiled_by_default(monkeypatch, undecided_colour_kernel):
    monkeypatch.delenv(T.COLOUR_KERNEL_ENV, raising=False)
    assert T.colour_kernel_backend() == "numba"
    assert T._colour_kernel() is colour_kernel.colour_crop
    # and a transform built with defaults renders its colour with it: its
    # step timers see the compiled step, none of the NumPy operations
    tr = make()
    img = natural_photo(375, 500, top=0, left=0)
    steps = {}
    params = tr.sample_params(*img.size, generator=torch.Generator().manual_seed(1))
    assert any(p.jitter is not None for p in params)
    tr.render_levels(T._as_uint8_tensor(img), params, timers=steps)
    assert "jitter + grayscale (compiled)" in steps
    assert not set(steps) & {"brightness", "contrast", "saturation", "hue", "grayscale"}


def test_colour_kernel_env_selects_numpy_and_rejects_unknown_values(monkeypatch, undecided_colour_kernel):
    monkeypatch.setenv(T.COLOUR_KERNEL_ENV, "numpy")
    assert T.colour_kernel_backend() == "numpy (SWAV_PLUGIN_COLOUR_KERNEL=numpy)"
    img = natural_photo(40, 50)
    torch.manual_seed(3)
    a = make(nmb_crops=[2], size_crops=[32], min_scale_crops=[0.3], max_scale_crops=[1.0])(img)
    T._COLOUR_KERNEL.clear()
    monkeypatch.setenv(T.COLOUR_KERNEL_ENV, "numba")
    torch.manual_seed(3)
    b = make(nmb_crops=[2], size_crops=[32], min_scale_crops=[0.3], max_scale_crops=[1.0])(img)
    assert T.colour_kernel_backend() == "numba"
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a bad value is refused when the transform is built, naming the variable
    T._COLOUR_KERNEL.clear()
    monkeypatch.setenv(T.COLOUR_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=r"SWAV_PLUGIN_COLOUR_KERNEL='fast'.*'numba', 'numpy'"):
        make()


def test_without_numba_the_numpy_operations_run_with_a_warning(monkeypatch, undecided_colour_kernel):
    import sys

    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "swav_vissl_plugin.colour_kernel")
    monkeypatch.delenv(T.COLOUR_KERNEL_ENV, raising=False)
    img = natural_photo(40, 50)
    with pytest.warns(UserWarning, match="Numba cannot be imported.*NumPy operations"):
        tr = make(nmb_crops=[2], size_crops=[32], min_scale_crops=[0.3], max_scale_crops=[1.0])
    crops = tr(img)
    assert T.colour_kernel_backend().startswith("numpy (Numba cannot be imported")
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2
    # required explicitly: a clear error instead of the slow path
    T._COLOUR_KERNEL.clear()
    monkeypatch.setenv(T.COLOUR_KERNEL_ENV, "numba")
    with pytest.raises(ImportError, match="SWAV_PLUGIN_COLOUR_KERNEL=numba, but Numba cannot be imported"):
        make()
