"""Benchmark 2: the multi-crop data pipeline, images per second on one core.

From JPEG bytes of a ~500x375 photograph to the 8 normalised tensors of the
recipe (2x224 + 6x96, crop scales (0.14, 1) and (0.05, 0.14), flip 0.5,
colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, PIL Gaussian
blur p 0.5 radius U(0.1, 2), ToTensor, Normalize(mean, std of the recipe)):

* ``plugin``: ``SwavPluginMultiCrop`` through VISSL's transform wrapper (as
  VISSL's dataset calls it; values equal to the torchvision chain's for the
  same random parameters except resize (within 1 level) and blur (within 3
  levels), see swav_vissl_plugin/transforms.py);
* ``vissl``: VISSL 0.1.6's built-in chain, as in its quick_swav config:
  ``ImgPilToMultiCrop``, ``RandomHorizontalFlip``, ``ImgPilColorDistortion``,
  ``ImgPilGaussianBlur``, ``ToTensor``, ``Normalize`` through the same wrapper;
* ``straightforward``: the SwAV release's torchvision/PIL pipeline (one
  ``Compose`` per crop size: ``RandomResizedCrop``, ``RandomHorizontalFlip``,
  ``RandomApply(ColorJitter)``, ``RandomGrayscale``, PIL blur, ``ToTensor``,
  ``Normalize``) applied to one decoded image.

Each pipeline decodes the JPEG as its data source does: VISSL's datasets and
the release's ``ImageFolder`` with torchvision's ``pil_loader``
(``Image.open(bytes).convert("RGB")``, which copies an RGB image once more);
the plugin with its data sources' loader (``data_source.load_rgb``: decoded,
converted only when not RGB). ``plugin_pil_loader``, the plugin's transform
after ``pil_loader``, is timed too: the transform alone against the others.
One core: the benchmark runs in one process with one torch thread and one
BLAS thread (PIL is single-threaded).

    .venv/bin/python benchmarks/bench_transforms.py [--tiny] [--profile]
"""

import io
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import _common as C  # noqa: E402

MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]
FULL = dict(nmb_crops=[2, 6], size_crops=[224, 96], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14])
TINY = dict(nmb_crops=[2, 2], size_crops=[32, 16], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14])


def sample_jpegs(size=(500, 375), quality=90):
    """JPEG bytes of two natural photographs (scikit-learn's sample images,
    shipped with its wheel), resized to ``size``."""
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        img = Image.fromarray(load_sample_image(name)).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    """torchvision's ``pil_loader``, which VISSL's datasets and the release's
    ``ImageFolder`` use."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def plugin_decode(data: bytes) -> Image.Image:
    """The plugin's data sources' loader (``swav_plugin_disk_folder`` /
    ``_filelist``): decoded, converted only when not RGB."""
    from swav_vissl_plugin.data_source import load_rgb

    return load_rgb(io.BytesIO(data))


# ----------------------------------------------------- the release's pipeline
class PILRandomGaussianBlur:
    """The SwAV release's blur (src/multicropdataset.py)."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        do_it = np.random.rand() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def straightforward_pipeline(cfg):
    import torchvision.transforms as T

    color = T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2)])
    trans = []
    for n, size, lo, hi in zip(cfg["nmb_crops"], cfg["size_crops"], cfg["min_scale_crops"], cfg["max_scale_crops"]):
        t = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(lo, hi)),
                T.RandomHorizontalFlip(p=0.5),
                color,
                PILRandomGaussianBlur(),
                T.ToTensor(),
                T.Normalize(mean=MEAN, std=STD),
            ]
        )
        trans.extend([t] * n)

    def run(data: bytes):
        img = decode(data)
        return [t(img) for t in trans]

    return run


def vissl_pipeline(cfg):
    from vissl.data.ssl_transforms import get_transform

    total = sum(cfg["nmb_crops"])
    transform = get_transform(
        [
            {
                "name": "ImgPilToMultiCrop",
                "total_num_crops": total,
                "size_crops": cfg["size_crops"],
                "num_crops": cfg["nmb_crops"],
                "crop_scales": [[lo, hi] for lo, hi in zip(cfg["min_scale_crops"], cfg["max_scale_crops"])],
            },
            {"name": "RandomHorizontalFlip", "p": 0.5},
            {"name": "ImgPilColorDistortion", "strength": 1.0},
            {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
            {"name": "ToTensor"},
            {"name": "Normalize", "mean": MEAN, "std": STD},
        ]
    )

    def run(data: bytes):
        return transform({"data": [decode(data)], "label": [0], "data_valid": [1], "data_idx": [0]})["data"]

    return run


def plugin_pipeline(cfg, loader=plugin_decode, colour_kernel=True):
    """The plugin through VISSL's transform wrapper; ``colour_kernel=False``:
    its NumPy colour operations instead of the compiled kernel."""
    import swav_vissl_plugin  # noqa: F401  (registers SwavPluginMultiCrop)
    from vissl.data.ssl_transforms import get_transform

    transform = get_transform([dict(cfg, name="SwavPluginMultiCrop", mean=MEAN, std=STD)])
    transform.transforms[0].transform.use_colour_kernel = colour_kernel

    def run(data: bytes):
        return transform({"data": [loader(data)], "label": [0], "data_valid": [1], "data_idx": [0]})["data"]

    return run


def pipelines(cfg):
    return {
        "plugin": plugin_pipeline(cfg),
        "plugin_pil_loader": plugin_pipeline(cfg, loader=decode),
        "plugin_numpy_colour": plugin_pipeline(cfg, colour_kernel=False),
        "vissl": vissl_pipeline(cfg),
        "straightforward": straightforward_pipeline(cfg),
    }


def output_stats(run, jpegs, n_images, seed=0):
    """Per crop size: number of crops, per-channel mean and std of the
    normalised outputs over ``n_images`` images, and per crop its channel
    means and standard deviations (the distribution check)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    by_size = {}
    for i in range(n_images):
        for t in run(jpegs[i % len(jpegs)]):
            by_size.setdefault(int(t.shape[-1]), []).append(t)
    out = {}
    for size, ts in sorted(by_size.items(), reverse=True):
        x = torch.stack(ts).double()
        per_crop_mean = x.mean(dim=(2, 3))  # (n, 3)
        out[size] = {
            "crops": len(ts),
            "mean": x.mean(dim=(0, 2, 3)).tolist(),
            "std": x.std(dim=(0, 2, 3)).tolist(),
            "crop_mean_sd": per_crop_mean.std(dim=0).tolist(),
            "crop_means": per_crop_mean.tolist(),
            "crop_stds": x.std(dim=(2, 3)).tolist(),
        }
    return out


def stage_times(cfg, jpegs, n_images):
    """Where the plugin's time goes: process CPU time per image (ms) of each
    step (decode, parameter draw, source copy, the steps timed inside
    ``SwavPluginMultiCrop.render_levels``, ToTensor + Normalize), each image
    followed by one image of the straightforward pipeline (same process,
    same conditions) for comparison."""
    import time

    import swav_vissl_plugin  # noqa: F401
    from swav_vissl_plugin.transforms import SwavPluginMultiCrop, _as_uint8_tensor

    tr = SwavPluginMultiCrop.from_config(dict(cfg, mean=MEAN, std=STD))
    straightforward = straightforward_pipeline(cfg)
    totals = {}

    def add(name, t0):
        totals[name] = totals.get(name, 0.0) + time.process_time() - t0

    for i in range(n_images + 2):
        if i == 2:  # the first two warm up
            totals.clear()
        data = jpegs[i % len(jpegs)]
        t0 = time.process_time()
        img = plugin_decode(data)
        add("decode", t0)
        t0 = time.process_time()
        params = tr.sample_params(*img.size)
        add("sample_params", t0)
        t0 = time.process_time()
        source = _as_uint8_tensor(img)
        add("source (image memory view)", t0)
        buffers, _ = tr.render_levels(source, params, timers=totals)
        t0 = time.process_time()
        for x in buffers:
            x.mul_(tr._scale_t).add_(tr._shift_t)
        add("ToTensor + Normalize", t0)
        t0 = time.process_time()
        straightforward(data)
        add("(straightforward pipeline)", t0)
    return {name: 1e3 * t / n_images for name, t in totals.items()}


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--images-per-round", type=int, default=None)
    p.add_argument("--stages", type=int, default=0, metavar="N",
                   help="also time the plugin's steps over N images (see stage_times)")
    args = p.parse_args(argv)
    C.setup_torch(args.threads)
    info = C.machine_info(args.threads)
    cfg = TINY if args.tiny else FULL
    jpegs = sample_jpegs((64, 48) if args.tiny else (500, 375))
    runs = pipelines(cfg)
    state = {"i": 0}

    def bind(run):
        def call():
            state["i"] += 1
            return run(jpegs[state["i"] % len(jpegs)])

        return call

    fns = {name: bind(run) for name, run in runs.items()}
    # shapes and dtypes agree
    shapes = {name: [tuple(t.shape) for t in fn()] for name, fn in fns.items()}
    rounds = args.rounds or (3 if args.tiny else 15)
    number = args.images_per_round or (2 if args.tiny else 20)
    times = C.interleaved(fns, rounds=rounds, number=number, warmup=2)
    timing = C.analyse(times, [("plugin", "straightforward"), ("plugin", "vissl"),
                               ("plugin_pil_loader", "straightforward"),
                               ("plugin_numpy_colour", "straightforward"), ("plugin", "plugin_numpy_colour")])
    result = {
        "benchmark": "transforms",
        "command": C.command_line(),
        "machine": info,
        "rounds": rounds,
        "images_per_round": number,
        "image": "scikit-learn sample photos china.jpg / flower.jpg resized to %dx%d, JPEG q90" % ((64, 48) if args.tiny else (500, 375)),
        "shapes": shapes,
        "timing": timing,
        "images_per_second": {
            kind: {name: 1.0 / s["median"] for name, s in timing[kind]["summary"].items()}
            for kind in timing
        },
        "targets": {"speedup_vs_straightforward": 3.0},
    }
    result["machine"]["load_after"] = C.load_avg()
    if args.profile:
        result["profiles"] = {name: C.cprofile(fn, calls=40 if not args.tiny else 2) for name, fn in fns.items()}
    if args.stages:
        result["stages_ms_per_image"] = stage_times(cfg, jpegs, args.stages)
    C.write_json(args.json, result)
    print(report(result))
    for name, text in result.get("profiles", {}).items():
        print(f"\n#### profile {name}\n```\n{text}\n```")
    return result


#: the plugin's steps in the order they run (rows of the step table)
STEP_ORDER = {name: i for i, name in enumerate([
    "decode", "sample_params", "source (image memory view)", "resize", "jitter + grayscale (compiled)",
    "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "ToTensor + Normalize"])}


def report(result):
    out = []
    if "stages_ms_per_image" in result:
        st = result["stages_ms_per_image"]
        steps = sorted((k for k in st if not k.startswith("(")), key=lambda k: STEP_ORDER.get(k, len(STEP_ORDER)))
        plugin = sum(st[k] for k in steps)
        rows = [[k, "%.2f" % st[k]] for k in steps] + [["plugin, all steps", "%.2f" % plugin]]
        rows += [[k, "%.2f" % v] for k, v in st.items() if k.startswith("(")]
        out.append("plugin steps (process CPU ms per image)\n")
        out.append(C.md_table(["step", "ms / image"], rows) + "\n")
    for kind in ("cpu", "wall"):
        s = result["timing"][kind]["summary"]
        ips = result["images_per_second"][kind]
        r1 = result["timing"][kind]["ratios"]["plugin/straightforward"]
        r2 = result["timing"][kind]["ratios"]["plugin/vissl"]
        r3 = result["timing"][kind]["ratios"]["plugin_pil_loader/straightforward"]
        r4 = result["timing"][kind]["ratios"]["plugin_numpy_colour/straightforward"]
        r5 = result["timing"][kind]["ratios"]["plugin/plugin_numpy_colour"]
        rows = [
            [name, C.fmt_row_time(s[name]), "%.1f" % ips[name]]
            for name in ("plugin", "plugin_pil_loader", "plugin_numpy_colour", "vissl", "straightforward")
        ]
        out.append(f"{kind} time\n")
        out.append(C.md_table(["pipeline", f"{kind} time per image, median (p25-p75)", "images/s"], rows))
        out.append(
            f"\nplugin speed-up ({kind}): x{1 / r1['of_medians']:.2f} vs straightforward "
            f"(per-round median x{1 / r1['median_per_round']:.2f}; target x{result['targets']['speedup_vs_straightforward']:.0f}), "
            f"x{1 / r2['of_medians']:.2f} vs VISSL's built-in chain (per-round x{1 / r2['median_per_round']:.2f}); "
            f"the transform alone (both decoding with pil_loader): x{1 / r3['of_medians']:.2f} "
            f"(per-round x{1 / r3['median_per_round']:.2f}); with the NumPy colour operations instead of the "
            f"compiled kernel: x{1 / r4['of_medians']:.2f} (per-round x{1 / r4['median_per_round']:.2f}), the "
            f"kernel's gain x{1 / r5['of_medians']:.2f} (per-round x{1 / r5['median_per_round']:.2f}).\n"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
