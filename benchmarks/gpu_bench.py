"""The GPU part of issue 6's benchmarks (never run by ``make test``/``make bench``).

On a machine with a CUDA device, runs benchmarks 1, 3 and 5 on ``cuda:0``
(same scripts as on CPU, with ``--device cuda``: timing synchronises the
device; peak memory is torch's ``max_memory_allocated``) and writes
``benchmarks/results/gpu_*.json``:

* loss (plugin vs VISSL's ``swav_loss`` vs the release's formulas), B=64,
  8 crops, K=3000, D=128, without and with a 3840 queue;
* LARC step over ResNet-50 + SwAV head parameters (plugin vs Apex's loop:
  on GPU the loop also pays two device-to-host syncs per parameter);
* scaling of Sinkhorn and loss for B in {64, 256, 1024} x K in {3000, 16384,
  65536} (``--max-gb`` bounds the cases by device memory).

    .venv/bin/python benchmarks/gpu_bench.py [--tiny] [--max-gb 60]

The CPU numbers in docs/performance.md come from ``make bench``.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-gb", type=float, default=60.0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)

    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing run")
        return 1
    import bench_larc
    import bench_loss
    import bench_scaling

    os.makedirs(args.out, exist_ok=True)
    tiny = ["--tiny"] if args.tiny else []
    common = tiny + ["--device", args.device]
    bench_loss.main(common + ["--json", os.path.join(args.out, "gpu_loss.json")])
    bench_larc.main(common + ["--json", os.path.join(args.out, "gpu_larc.json")])
    bench_scaling.main(
        common + ["--max-gb", str(args.max_gb), "--json", os.path.join(args.out, "gpu_scaling.json")]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
