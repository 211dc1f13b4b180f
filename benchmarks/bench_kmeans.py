#!/usr/bin/env python
"""Benchmark of DeepCluster-v2's distributed spherical k-means on one process.

Clusters an ``N x D`` bank of random unit vectors into ``K`` clusters with
``swav_vissl_plugin.clustering.spherical_kmeans`` (the issue's benchmark:
100,000 x 128 into 3000 clusters, 10 iterations) and prints a markdown row:
size, dimension, clusters, iterations, median wall time over the repeats
(with min and max), the median process CPU time (all threads; less
sensitive than wall time to other processes on the machine), the peak resident memory above the resident memory
before clustering (Linux ``VmHWM`` reset just before, else ``getrusage``;
tracemalloc does not see PyTorch's allocations), the rows per E-step chunk and the torch threads.

    python benchmarks/bench_kmeans.py                      # the issue's size
    python benchmarks/bench_kmeans.py --size 20000 --repeats 1
    python benchmarks/bench_kmeans.py --json               # also a JSON line

Runs without VISSL and without torch.distributed (one rank): it loads
``swav_vissl_plugin/clustering.py`` next to this script as a module of its
own (that file imports only torch), so the package's VISSL registration is
not imported; ``--installed`` imports ``swav_vissl_plugin.clustering``
instead.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "swav_vissl_plugin" / "clustering.py"


def load_clustering(installed: bool):
    """The clustering module: the source file next to this script (default)
    or the installed package's."""
    if installed or not SOURCE.exists():
        from swav_vissl_plugin import clustering

        return clustering
    spec = importlib.util.spec_from_file_location("swav_plugin_clustering_bench", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc), MB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024  # kB
    raise OSError(field)


def reset_peak_rss() -> None:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space, MB: VmHWM
    (Linux), else ``getrusage`` maximum RSS. (``ru_maxrss`` survives exec:
    a process started from a large parent reports the parent's size.)"""
    try:
        return _status_mb("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def m_step_loop(bank, labels, k):
    """The M step with a Python loop over clusters (how the release and
    VISSL's built-in compute it), for comparison only."""
    import torch

    sums = torch.zeros(k, bank.shape[1], dtype=bank.dtype)
    counts = torch.zeros(k, dtype=torch.long)
    order = torch.argsort(labels)
    ends = torch.cumsum(torch.bincount(labels, minlength=k), 0).tolist()
    start = 0
    for c in range(k):
        rows = order[start:ends[c]]
        if rows.numel():
            sums[c] = bank[rows].sum(dim=0)
            counts[c] = rows.numel()
        start = ends[c]
    return sums, counts


def m_step_vectorised(bank, labels, k):
    """The M step as spherical_kmeans computes it: index_add_ + bincount."""
    import torch

    sums = torch.zeros(k, bank.shape[1], dtype=bank.dtype)
    sums.index_add_(0, labels, bank)
    return sums, torch.bincount(labels, minlength=k)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000, help="bank rows N (default 100000)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension D (default 128)")
    parser.add_argument("--clusters", type=int, default=3000, help="clusters K (default 3000)")
    parser.add_argument("--iterations", type=int, default=10, help="k-means iterations (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per E-step chunk (default 2**24 // K)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument("--installed", action="store_true", help="use the installed swav_vissl_plugin.clustering")
    parser.add_argument(
        "--compare-m-step",
        action="store_true",
        help="also time one M step as a Python loop over clusters vs index_add_ (median of the repeats)",
    )
    args = parser.parse_args(argv)

    import torch

    clustering = load_clustering(args.installed)
    chunk_rows, spherical_kmeans = clustering.chunk_rows, clustering.spherical_kmeans

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    bank = torch.nn.functional.normalize(torch.randn(args.size, args.dim, generator=g), dim=1)
    reset_peak_rss()
    baseline = current_rss_mb()
    load_before = load_avg()
    times, cpu_times = [], []
    result = None
    for r in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = spherical_kmeans(
            bank,
            args.clusters,
            args.iterations,
            generator=torch.Generator().manual_seed(args.seed + r),
            chunk_size=args.chunk_size,
            distributed=False,
        )
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_increase = max(0.0, peak_rss_mb() - baseline)
    out = {
        "size": args.size,
        "dim": args.dim,
        "clusters": args.clusters,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_increase_mb": peak_increase,
        "bank_mb": bank.numel() * bank.element_size() / 2**20,
        "full_score_matrix_mb": args.size * args.clusters * 4 / 2**20,
        "chunk_rows": chunk_rows(args.clusters, args.chunk_size),
        "threads": torch.get_num_threads(),
        "final_objective": result.objective[-1],
        "empty_clusters": int((result.counts == 0).sum()),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": load_before,
        "load_after": load_avg(),
    }
    print(
        f"machine: {out['cpu']}, {out['cores']} cores, torch {out['torch']}, {out['threads']} threads; "
        f"{out['date']}; load average before {out['load_before']}, after {out['load_after']}"
    )
    print(
        "| N | D | K | iterations | median time (min-max), repeats | median CPU time | "
        "peak RSS increase while clustering | E-step chunk (rows) | torch threads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {out['size']:,} | {out['dim']} | {out['clusters']} | {out['iterations']} | "
        f"{out['median_s']:.2f} s ({out['min_s']:.2f}-{out['max_s']:.2f}), {out['repeats']} | "
        f"{out['median_cpu_s']:.1f} s | "
        f"{out['peak_rss_increase_mb']:.0f} MB (full N x K scores: {out['full_score_matrix_mb']:.0f} MB) | "
        f"{out['chunk_rows']} | {out['threads']} |"
    )
    if args.compare_m_step:
        labels = result.labels
        loop_t, vec_t = [], []
        for _ in range(args.repeats):
            for fn, acc in ((m_step_loop, loop_t), (m_step_vectorised, vec_t)):
                start = time.perf_counter()
                fn(bank, labels, args.clusters)
                acc.append(time.perf_counter() - start)
        a, b = m_step_loop(bank, labels, args.clusters), m_step_vectorised(bank, labels, args.clusters)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-4)
        out["m_step_loop_s"] = statistics.median(loop_t)
        out["m_step_index_add_s"] = statistics.median(vec_t)
        print(
            f"one M step, {args.size:,} x {args.dim} into {args.clusters}: Python loop over clusters "
            f"{out['m_step_loop_s']:.3f} s, index_add_ + bincount {out['m_step_index_add_s']:.3f} s "
            f"(median of {args.repeats})"
        )
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
