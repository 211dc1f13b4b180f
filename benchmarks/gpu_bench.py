"""The GPU part of issue 6's benchmarks (never run by ``make test``/``make bench``).

On a machine with a CUDA device, runs in this order, within ``--budget-s``
(default 450 s), and writes ``gpu_<step>.json`` per step plus
``gpu_bench.json`` (what ran, how long, what was skipped) to ``--json-dir``:

1. ``train``: ``bench_gpu_train.py``, the SwAV training iteration on one
   device (ResNet-50, 2x224 + 6x96, batch 64): images/s for fp32, fp16 +
   GradScaler and bf16, NCHW and channels_last, torch.compile of the trunk,
   synthetic crops and the real data pipeline; MFU; the projected epoch time
   of one 8-GPU node. In a child process stopped after its share of the
   budget (``--train-budget-s``) plus a margin.
2. ``loss``: plugin vs VISSL's ``swav_loss`` vs the release's formulas,
   B=64, 8 crops, K=3000, D=128, without and with a 3840 queue;
3. ``larc``: LARC step over ResNet-50 + SwAV head parameters (plugin vs
   Apex's loop: on GPU the loop also pays two device-to-host syncs per
   parameter);
4. ``scaling``: Sinkhorn and loss for B in {64, 256, 1024} x K in {3000,
   16384, 65536} (``--max-gb`` bounds the cases by device memory).

Steps 2-4 are the CPU benchmarks' scripts with ``--device cuda`` (timing
synchronises the device; peak memory is ``max_memory_allocated``). A step
that the remaining budget cannot hold is skipped and reported; a failing step
does not stop the next ones (exit status 1 if any failed). Each step prints
the time elapsed since the start.

    .venv/bin/python benchmarks/gpu_bench.py [--json-dir DIR] [--budget-s 450]
    .venv/bin/python benchmarks/gpu_bench.py --device cpu --tiny   # smoke run
    benchmarks/gpu_check.sh     # tests marked gpu, then this, with time limits

The CPU numbers in docs/performance.md come from ``make bench``.
"""

import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

#: Least seconds a step needs to be worth starting (GPU, full size).
MIN_SECONDS = {"train": 60.0, "loss": 20.0, "larc": 15.0, "scaling": 40.0}
#: Seconds kept for steps 2-4 out of the total budget by default.
RESERVED_AFTER_TRAIN = 110.0
#: The train step's child may run this much past its own budget (a variant
#: started just before the budget ran out finishes) before it is stopped.
TRAIN_MARGIN_S = 45.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-gb", type=float, default=60.0)
    p.add_argument("--json-dir", "--out", dest="json_dir", default=os.path.join(HERE, "results"),
                   help="where the gpu_*.json results go (default benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all steps")
    p.add_argument("--train-budget-s", type=float, default=None,
                   help=f"budget of the training benchmark (default: total - {RESERVED_AFTER_TRAIN:.0f} s)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the training benchmark")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")

    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing run")
        return 1
    os.makedirs(args.json_dir, exist_ok=True)
    t_start = time.perf_counter()
    train_budget = args.train_budget_s or max(MIN_SECONDS["train"], args.budget_s - RESERVED_AFTER_TRAIN)
    tiny = ["--tiny"] if args.tiny else []
    common = tiny + ["--device", args.device]

    def out(name):
        return os.path.join(args.json_dir, f"gpu_{name}.json")

    def train():
        import bench_gpu_train

        cmd = [sys.executable, os.path.join(HERE, "bench_gpu_train.py"), "--json", out("train"),
               "--budget-s", str(train_budget)] + common
        cmd += ["--workers", str(args.workers)] if args.workers is not None else []
        rc, _ = bench_gpu_train.run_capped(cmd, min(train_budget + TRAIN_MARGIN_S, remaining()))
        if rc is None:
            raise RuntimeError(f"stopped after {train_budget + TRAIN_MARGIN_S:.0f} s "
                               f"(results so far in {out('train')})")
        if rc != 0:
            raise RuntimeError(f"bench_gpu_train.py exited with {rc}")

    def loss():
        import bench_loss

        bench_loss.main(common + ["--json", out("loss")])

    def larc():
        import bench_larc

        bench_larc.main(common + ["--json", out("larc")])

    def scaling():
        import bench_scaling

        bench_scaling.main(common + ["--max-gb", str(args.max_gb), "--json", out("scaling")])

    def remaining():
        return args.budget_s - (time.perf_counter() - t_start)

    steps = []
    for name, fn in (("train", train), ("loss", loss), ("larc", larc), ("scaling", scaling)):
        need = 0.0 if args.tiny else MIN_SECONDS[name]
        record = {"step": name, "json": out(name)}
        if remaining() < need:
            record.update(status="skipped", reason=f"{remaining():.0f} s of the budget left, needs >= {need:.0f} s")
        else:
            print(f"== gpu_bench {name}: start at {time.perf_counter() - t_start:.0f} s", flush=True)
            t0 = time.perf_counter()
            try:
                fn()
                record["status"] = "done"
            except Exception as e:  # the next steps still run
                traceback.print_exc()
                record.update(status="failed", reason=f"{type(e).__name__}: {e}")
            record["seconds"] = time.perf_counter() - t0
        steps.append(record)
        print(f"== gpu_bench {name}: {record['status']}{': ' + record['reason'] if 'reason' in record else ''}"
              f" (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
    summary = {
        "benchmark": "gpu_bench",
        "command": C.command_line(),
        "machine": C.machine_info(),
        "budget_s": args.budget_s,
        "train_budget_s": train_budget,
        "elapsed_s": time.perf_counter() - t_start,
        "steps": steps,
    }
    C.write_json(out("bench"), summary)
    print(C.md_table(["step", "status", "seconds", "result"],
                     [[s["step"], s["status"] + (f": {s['reason']}" if "reason" in s else ""),
                       f"{s['seconds']:.0f}" if "seconds" in s else "-", s["json"]] for s in steps]))
    return 1 if any(s["status"] == "failed" for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
