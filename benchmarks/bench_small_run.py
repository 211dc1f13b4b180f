"""Benchmark 6: what a CPU-sized run (the quickstart) spends outside the recipe.

* ``trunk``: forward + backward of ``swav_plugin_small_cnn`` with the
  small-image recipe's head on one quickstart batch (2 x 28 px + 4 x 14 px
  crops of 64 images, crops of one size batched together as VISSL does):
  ``channels_last`` (the trunk's own choice) against the same module fed
  contiguous NCHW tensors with the memory-format switch bypassed
  (``nchw``). Same values: the largest score difference is reported (the
  test bounds it by the float32 rounding of the sums along the path).
* ``loader_start``: the time until a freshly started loader worker has
  built one sample of the quickstart's dataset under VISSL's forkserver:
  ``preloaded`` (the plugin's forkserver preload,
  swav_vissl_plugin.compat.patch_forkserver_preload) against ``cold`` (VISSL's
  own setup: the worker imports torch, VISSL and the plugin and loads the
  colour kernel). VISSL starts its loader workers anew every epoch, so this is
  paid once per worker and epoch.

    .venv/bin/python benchmarks/bench_small_run.py [--tiny]
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

# A worker's start as VISSL's loader sees it: a forkserver process builds one
# multi-crop sample (import, unpickle, transform) and returns.
LOADER_CHILD = """
import multiprocessing, sys, time
import swav_vissl_plugin
from swav_vissl_plugin import compat
from vissl.engines import train
setup = train.setup_multiprocessing_method
if sys.argv[1] == "cold":
    setup = compat.ORIGINALS[(train.__name__, "setup_multiprocessing_method")]
setup("forkserver")
job = ("__import__('swav_vissl_plugin.transforms', fromlist=['SwavPluginMultiCrop']).SwavPluginMultiCrop("
       "[2, 4], [28, 14], [0.5, 0.2], [1.0, 0.5])(__import__('PIL.Image', fromlist=['Image']).new('RGB', (28, 28)))")
with multiprocessing.Pool(1) as pool:
    pool.apply(eval, ("0",))  # the forkserver itself starts (and preloads) once per process
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    with multiprocessing.Pool(1) as pool:
        pool.apply(eval, (job,))
    print(time.perf_counter() - t0, flush=True)
"""


def trunk_case(batch: int):
    import torch
    from vissl.models import build_model

    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.trunks import SwavPluginSmallCNN

    _, cfg = compose(["config=swav_plugin/pretrain/swav_small_images", "config.DATA.TRAIN.DATA_PATHS=[.]"],
                     dump_config=False)
    torch.manual_seed(0)
    model = build_model(cfg.MODEL, cfg.OPTIMIZER)
    crops = [torch.randn(2 * batch, 3, 28, 28), torch.randn(4 * batch, 3, 14, 14)]

    def step():
        out = model(crops)[0][1]
        out.logsumexp(1).mean().backward()
        model.zero_grad(set_to_none=True)
        return out.detach()

    forward = SwavPluginSmallCNN.forward

    def nchw_forward(self, x, out_feat_keys=None):  # the same module without the switch
        from vissl.models.model_helpers import get_trunk_forward_outputs_module_list

        return get_trunk_forward_outputs_module_list(x, out_feat_keys, self._feature_blocks, self.all_feat_names)

    def nchw():
        SwavPluginSmallCNN.forward = nchw_forward
        try:
            return step()
        finally:
            SwavPluginSmallCNN.forward = forward

    return {"channels_last": step, "nchw": nchw}


def loader_start(kind: str, starts: int):
    out = subprocess.run([sys.executable, "-c", LOADER_CHILD, kind, str(starts)], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return [float(v) for v in out.stdout.split()]


def main(argv=None):
    import statistics

    import torch

    p = C.base_parser(__doc__.splitlines()[0])
    a = p.parse_args(argv)
    C.setup_torch(a.threads)
    batch = 8 if a.tiny else 64
    rounds = a.rounds or (2 if a.tiny else 15)
    machine = C.machine_info(a.threads)
    fns = trunk_case(batch)
    ref, alt = fns["channels_last"](), fns["nchw"]()
    # reported, and bounded by tests/test_benchmarks.py from the float32 sums along the path
    max_diff = float((ref - alt).abs().max())
    times = C.interleaved(fns, rounds)
    starts = 1 if a.tiny else 5
    cold, warm = loader_start("cold", starts), loader_start("preloaded", starts)
    result = {
        "benchmark": "small_run",
        "command": C.command_line(),
        "machine": {**machine, "load_after": C.load_avg()},
        "batch": batch,
        "trunk": {"cpu": C.summary(times["cpu"]), "wall": C.summary(times["wall"]),
                  "ratio_cpu": C.ratio(times["cpu"], "channels_last", "nchw"), "max_abs_diff": max_diff},
        "loader_start": {"cold": cold, "preloaded": warm,
                         "cold_median": statistics.median(cold), "preloaded_median": statistics.median(warm)},
        "torch": torch.__version__,
    }
    C.write_json(a.json, result)
    print(report(result))
    return 0


def report(res) -> str:
    t = res["trunk"]
    rows = [[name, C.fmt_row_time(t["cpu"][name]), C.fmt_row_time(t["wall"][name])] for name in ("channels_last", "nchw")]
    r = t["ratio_cpu"]
    ls = res["loader_start"]
    lines = [
        f"Small trunk, forward + backward of one batch ({res['batch']} images x (2 x 28 + 4 x 14) px), "
        f"median (25th-75th percentile) per call:",
        "",
        C.md_table(["input memory format", "CPU time", "wall time"], rows),
        "",
        f"channels_last / nchw CPU time: {r['of_medians']:.2f} (per round {r['median_per_round']:.2f}); "
        f"largest score difference {t['max_abs_diff']:.1e}.",
        "",
        f"Loader worker start to its first sample under forkserver (median of {len(ls['cold'])}): "
        f"preloaded {ls['preloaded_median']:.2f} s, cold {ls['cold_median']:.2f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
