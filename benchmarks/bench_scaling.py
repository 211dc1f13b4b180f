"""Benchmark 5: how the plugin's Sinkhorn and loss scale with B and K.

For per-GPU batch B in {64, 256, 1024} and K in {3000, 16384, 65536}
prototypes (fp32, D irrelevant: the scores are given):

* ``sinkhorn``: :func:`swav_vissl_plugin.sinkhorn.sinkhorn_knopp` on one
  crop's ``(B, K)`` scores (3 iterations, epsilon 0.05);
* ``loss``: :func:`swav_vissl_plugin.sinkhorn.swav_loss`, forward + backward,
  on ``(8 B, K)`` scores (2x224 + 6x96 crops, crops_for_assign [0, 1],
  temperature 0.1): two Sinkhorns plus the swapped prediction.

Time: median of repeated calls (one torch thread). Peak memory: the rise of
the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before each measurement) over the resident memory
before the call, inputs excluded. Cases whose estimated peak exceeds
``--max-gb`` (default 6 GiB; the machine is shared) are skipped and listed.
The growth exponents are least-squares slopes of log(time) and log(memory)
against log(B) and log(K).

    .venv/bin/python benchmarks/bench_scaling.py [--tiny] [--max-gb 6]
"""

import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

FULL_B = [64, 256, 1024]
FULL_K = [3000, 16384, 65536]
TINY_B = [4, 8]
TINY_K = [10, 20]
NUM_CROPS, CROPS_FOR_ASSIGN, TEMPERATURE, EPSILON, ITERS = 8, [0, 1], 0.1, 0.05, 3


def _status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(fn, device="cpu") -> float:
    """Rise of the resident high-water mark during ``fn()`` (MiB); on CUDA,
    of torch's peak allocated memory."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    if not _reset_peak():
        return float("nan")
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def scores(rows, k, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # cosine-like scores in [-1, 1] (L2-normalised embeddings x prototypes)
    emb = F.normalize(torch.randn(rows, 32, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, 32, generator=g), dim=1)
    return (emb @ protos.t()).to(device)


def estimate_gb(kind, b, k):
    elems = (b if kind == "sinkhorn" else NUM_CROPS * b) * k
    # sinkhorn: kernel + block temporaries (+ codes); loss: scores, log-probs,
    # gradient, its log-softmax backward, (B, K) targets
    factor = 2.5 if kind == "sinkhorn" else 5.0
    return elems * 4 * factor / 2 ** 30


def measure(kind, b, k, reps, device="cpu"):
    from swav_vissl_plugin.sinkhorn import sinkhorn_knopp, swav_loss

    if kind == "sinkhorn":
        s = scores(b, k, device=device)

        def fn():
            return sinkhorn_knopp(s, EPSILON, ITERS)

    else:
        s = scores(NUM_CROPS * b, k, device=device).requires_grad_(True)

        def fn():
            s.grad = None
            loss = swav_loss(s, NUM_CROPS, CROPS_FOR_ASSIGN, TEMPERATURE, EPSILON, ITERS)
            loss.backward()
            s.grad = None
            return loss

    sync = C.device_sync(device) or (lambda: None)
    fn()  # warm-up
    mem = peak_mb(fn, device)
    wall, cpu = [], []
    for _ in range(reps):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "wall_median": statistics.median(wall),
        "wall_min": min(wall),
        "cpu_median": statistics.median(cpu),
        "peak_mb": mem,
        "input_mb": s.numel() * 4 / 2 ** 20,
        "reps": reps,
    }


def fit_exponents(rows, key):
    """Least squares: log y = c + a log B + b log K (rows with y > 0)."""
    pts = [(math.log(r["B"]), math.log(r["K"]), math.log(r[key])) for r in rows if r.get(key, 0) and r[key] > 0]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    mz = sum(p[2] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    syy = sum((p[1] - my) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    sxz = sum((p[0] - mx) * (p[2] - mz) for p in pts)
    syz = sum((p[1] - my) * (p[2] - mz) for p in pts)
    det = sxx * syy - sxy ** 2
    if det == 0:
        return None
    a = (sxz * syy - syz * sxy) / det
    b = (syz * sxx - sxz * sxy) / det
    return {"B": a, "K": b}


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-gb", type=float, default=6.0)
    args = p.parse_args(argv)
    C.setup_torch(args.threads)
    bs, ks = (TINY_B, TINY_K) if args.tiny else (FULL_B, FULL_K)
    info = C.machine_info(args.threads)
    info["device"] = args.device
    rows, skipped = [], []
    for kind in ("sinkhorn", "loss"):
        for b in bs:
            for k in ks:
                est = estimate_gb(kind, b, k)
                if est > args.max_gb:
                    skipped.append({"kind": kind, "B": b, "K": k, "estimated_gb": est})
                    continue
                elems = (b if kind == "sinkhorn" else NUM_CROPS * b) * k
                reps = args.rounds or (2 if args.tiny else max(3, min(15, int(2e8 / elems))))
                r = measure(kind, b, k, reps, args.device)
                r.update({"kind": kind, "B": b, "K": k})
                rows.append(r)
                print(f"{kind:8s} B={b:5d} K={k:6d}  {C.fmt_time(r['wall_median']):>9s}  "
                      f"cpu {C.fmt_time(r['cpu_median']):>9s}  peak +{r['peak_mb']:.0f} MiB", flush=True)
    info["load_after"] = C.load_avg()
    fits = {}
    for kind in ("sinkhorn", "loss"):
        sub = [r for r in rows if r["kind"] == kind]
        fits[kind] = {"cpu_time": fit_exponents(sub, "cpu_median"), "peak_mb": fit_exponents(sub, "peak_mb")}
    result = {
        "benchmark": "scaling",
        "command": C.command_line(),
        "machine": info,
        "rows": rows,
        "skipped": skipped,
        "exponents": fits,
    }
    C.write_json(args.json, result)
    print(report(result))
    return result


def report(result):
    rows = []
    for r in result["rows"]:
        rows.append([
            r["kind"], r["B"], r["K"],
            C.fmt_time(r["wall_median"]), C.fmt_time(r["cpu_median"]),
            "%.0f" % r["peak_mb"], "%.0f" % r["input_mb"],
        ])
    for s in result["skipped"]:
        rows.append([s["kind"], s["B"], s["K"], "skipped", "", "(est. %.1f GiB)" % s["estimated_gb"], ""])
    text = C.md_table(
        ["what", "B", "K", "wall (median)", "CPU (median)", "peak memory rise (MiB)", "input scores (MiB)"], rows
    )
    lines = [text, ""]
    for kind, f in result["exponents"].items():
        t, m = f["cpu_time"], f["peak_mb"]
        if t and m:
            lines.append(
                f"{kind}: CPU time ~ B^{t['B']:.2f} K^{t['K']:.2f}, peak memory ~ B^{m['B']:.2f} K^{m['K']:.2f} "
                "(least-squares exponents)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
