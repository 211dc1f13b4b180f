#!/usr/bin/env python
"""Prototype gallery of a SwAV (or DeepCluster-v2 / SeLa-v2) checkpoint of the plugin.

    python tools/prototype_gallery.py --checkpoint RUN/checkpoints --images FOLDER [--output DIR]

Writes DIR/prototype_gallery.png (the top images of the prototypes with the
most assigned images), DIR/prototype_gallery.html (all prototypes, with
purity when FOLDER has class sub-folders) and DIR/prototype_gallery.json.
See swav_vissl_plugin/gallery.py for what is computed.
"""

import argparse
import sys
from pathlib import Path

from swav_vissl_plugin.gallery import make_gallery


def _size(value: str):
    return None if value.lower() in ("none", "null") else ("auto" if value == "auto" else int(value))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a VISSL checkpoint file or checkpoint folder")
    p.add_argument("--images", required=True, help="image folder (<class>/<image> for purity, or flat)")
    p.add_argument("--config", default=None, help="the run's config YAML (default: train_config.yaml next to the checkpoint)")
    p.add_argument("--output", default=None, help="output folder (default: <checkpoint folder>/prototype_gallery)")
    p.add_argument("--num-prototypes", type=int, default=16, help="rows of the PNG (most-assigned prototypes)")
    p.add_argument("--prototypes", default=None, help="comma-separated prototype ids for the PNG instead")
    p.add_argument("--top", type=int, default=8, help="images per prototype")
    p.add_argument("--head", type=int, default=0, help="prototype layer (several heads)")
    p.add_argument("--tile", type=int, default=64, help="pixels per image")
    p.add_argument("--resize", type=_size, default="auto", help="shorter side of the full view (auto: the run's first crop size; none)")
    p.add_argument("--crop", type=_size, default="auto", help="centre crop of the full view (auto: the run's first crop size; none)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most this many images (evenly spaced)")
    a = p.parse_args(argv)
    ckpt = Path(a.checkpoint)
    output = a.output or str((ckpt if ckpt.is_dir() else ckpt.parent) / "prototype_gallery")
    result = make_gallery(
        a.checkpoint,
        a.images,
        output,
        config=a.config,
        num_prototypes=a.num_prototypes,
        top=a.top,
        prototypes=None if a.prototypes is None else [int(k) for k in a.prototypes.split(",") if k.strip()],
        head_index=a.head,
        tile=a.tile,
        resize=a.resize,
        crop=a.crop,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        limit=a.limit,
    )
    purity = result["overall_purity"]
    print(
        f"[prototype_gallery] {result['num_images']} images, {result['prototypes_used']}/{result['num_prototypes']} "
        f"prototypes used" + ("" if purity is None else f", overall purity {100 * purity:.1f}%")
        + f"\n[prototype_gallery] wrote {result['png']} ({result['png_size'][0]}x{result['png_size'][1]}), "
        f"{result['html']}, {result['json']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
