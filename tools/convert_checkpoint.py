#!/usr/bin/env python
"""Convert SwAV weights between the published layout and VISSL checkpoints.

    # published (torchvision trunk + projection_head/prototypes) -> VISSL
    python tools/convert_checkpoint.py to-vissl swav_800ep_pretrain.pth.tar swav_800ep_vissl.torch
    # any of the plugin's VISSL checkpoints -> published layout
    python tools/convert_checkpoint.py to-published checkpoints/model_final_checkpoint_phase799.torch swav.pth

Files are read with torch.load(weights_only=True); outputs are written
atomically and never overwrite an existing file without --force.
"""

import argparse
import sys

from swav_vissl_plugin.checkpoints import (
    CheckpointError,
    load_state,
    published_to_vissl_checkpoint,
    save_atomic,
    vissl_to_published,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["to-vissl", "to-published"])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    a = p.parse_args(argv)
    try:
        state = load_state(a.input)
        if a.direction == "to-vissl":
            out = published_to_vissl_checkpoint(state)
            n = len(out["classy_state_dict"]["base_model"]["model"]["trunk"])
        else:
            out = vissl_to_published(state)
            n = len(out)
        save_atomic(out, a.output, overwrite=a.force)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output} ({n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
