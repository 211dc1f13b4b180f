"""Benchmark 7: what one kNN monitor evaluation costs, per 1,000 images, at its view.

One evaluation of :class:`swav_vissl_plugin.knn.KnnMonitorHook` (trunk
features of the labelled and the evaluated folder, then the weighted kNN
vote) with the small-image trunk (``swav_small_images``) on the quickstart's
MNIST folders (28 px), at two views of the images:

* ``small_images``: the view every small-image config shares
  (``monitor/small_images_knn``: whole images at their own size);
* ``imagenet``: the ImageNet rows' view (shorter side resized to 256, centre
  crop 224), what a small-image config without that view would evaluate.

The time is per 1,000 images evaluated (train + val), the monitor's own
settings otherwise (batch 500, no loader workers). The ImageNet view upsamples
28 px images 9.1x, so it should cost about 9.1^2 = 83x the compute.

    .venv/bin/python benchmarks/bench_knn.py [--tiny]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIEWS = {"small_images": (None, None), "imagenet": (256, 224)}


def make_cases(train_limit: int, val_limit: int):
    import torch
    from vissl.models import build_model

    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.knn import KnnMonitorHook, knn_settings
    from swav_vissl_plugin.quickstart import prepare_image_folder

    splits = prepare_image_folder(os.path.join(ROOT, "output", "quickstart-data"))
    _, cfg = compose([
        "config=swav_plugin/pretrain/swav_small_images", "config.DATA.TRAIN.DATA_PATHS=[.]",
        f"config.SWAV_PLUGIN.MONITOR.KNN.TRAIN_PATH={splits['train']}",
        f"config.SWAV_PLUGIN.MONITOR.KNN.VAL_PATH={splits['val']}",
        f"config.SWAV_PLUGIN.MONITOR.KNN.TRAIN_LIMIT={train_limit}",
        f"config.SWAV_PLUGIN.MONITOR.KNN.VAL_LIMIT={val_limit}",
    ], dump_config=False)
    torch.manual_seed(0)
    trunk = build_model(cfg.MODEL, cfg.OPTIMIZER).trunk
    settings = knn_settings(cfg)
    hooks = {}
    for name, (resize, crop) in VIEWS.items():
        hooks[name] = KnnMonitorHook({**settings, "RESIZE": resize, "CROP": crop})
        hooks[name]._datasets()  # listing the folders is not part of an evaluation
    images = train_limit + val_limit
    return {name: (lambda h=h: h.evaluate(trunk)) for name, h in hooks.items()}, images, hooks


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    a = p.parse_args(argv)
    C.setup_torch(a.threads)
    train_limit, val_limit = (80, 20) if a.tiny else (1000, 250)
    rounds = a.rounds or (1 if a.tiny else 3)
    machine = C.machine_info(a.threads)
    fns, images, hooks = make_cases(train_limit, val_limit)
    upsampling = hooks["imagenet"]._datasets()[0].upsampling()
    t0 = time.time()
    times = C.interleaved(fns, rounds, warmup=0)
    per_1000 = {kind: {name: [t * 1000.0 / images for t in v] for name, v in t.items()}
                for kind, t in times.items()}
    result = {
        "benchmark": "knn",
        "command": C.command_line(),
        "machine": {**machine, "load_after": C.load_avg()},
        "images": images,
        "train_images": train_limit,
        "val_images": val_limit,
        "upsampling_imagenet_view": upsampling,
        "seconds_per_1000": {"cpu": C.summary(per_1000["cpu"]), "wall": C.summary(per_1000["wall"]),
                             "ratio_cpu": C.ratio(per_1000["cpu"], "imagenet", "small_images")},
        "total_seconds": time.time() - t0,
    }
    C.write_json(a.json, result)
    print(report(result))
    return 0


def report(res) -> str:
    s = res["seconds_per_1000"]
    labels = {"small_images": "whole images at their own size (small-image configs)",
              "imagenet": "resize 256, crop 224 (ImageNet rows)"}
    rows = [[labels[n], C.fmt_row_time(s["cpu"][n]), C.fmt_row_time(s["wall"][n])] for n in VIEWS]
    r = s["ratio_cpu"]
    up = res["upsampling_imagenet_view"]
    return "\n".join([
        f"One kNN monitor evaluation with the small-image trunk on the quickstart's 28 px images "
        f"({res['train_images']} train + {res['val_images']} val), seconds per 1,000 images evaluated, "
        f"median (25th-75th percentile):",
        "",
        C.md_table(["view", "CPU time", "wall time"], rows),
        "",
        f"ImageNet view / small-image view, CPU time: {r['of_medians']:.1f}x (per round "
        f"{r['median_per_round']:.1f}x); the ImageNet view upsamples the images {up:.1f}x "
        f"({up ** 2:.0f}x the pixels).",
    ])


if __name__ == "__main__":
    sys.exit(main())
