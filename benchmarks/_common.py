"""Shared helpers of the benchmarks: interleaved timing, machine description,
JSON results, markdown tables.

Timing method (all benchmarks): the compared implementations run in the same
process, interleaved (one block of calls of each, in a rotating order, per
round), so that a change of machine load hits all of them alike; the reported
value is the median over rounds of the per-call time of a block, with the
25th/75th percentiles as spread, and the ratio is computed from the medians
(and also per round, from the same round's blocks: its median is given too).
"""

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def machine_info(threads: Optional[int] = None) -> Dict[str, str]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": load_avg(),
    }
    if threads is not None:
        info["torch_threads"] = str(threads)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def percentile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def interleaved(
    fns: Dict[str, Callable[[], object]],
    rounds: int,
    number: int = 1,
    warmup: int = 1,
    sync: Optional[Callable[[], None]] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Per-call seconds of each function, one value per round, as wall-clock
    time and as this process's CPU time: ``{"wall": {name: [...]}, "cpu":
    {name: [...]}}``.

    Each round runs ``number`` calls of every function back to back; the
    order of the functions rotates from round to round. On a machine shared
    with other jobs, CPU time (``time.process_time``: what this process
    actually ran, not the time it waited for a core) is the steadier
    measure for single-threaded code; wall time is what a user waits."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if sync:
        sync()
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if sync:
                sync()
            wall[name].append((time.perf_counter() - t0) / number)
            cpu[name].append((time.process_time() - c0) / number)
    return {"wall": wall, "cpu": cpu}


def summary(times: Dict[str, List[float]]) -> Dict[str, Dict[str, float]]:
    return {
        name: {
            "median": statistics.median(v),
            "p25": percentile(v, 0.25),
            "p75": percentile(v, 0.75),
            "min": min(v),
            "rounds": len(v),
        }
        for name, v in times.items()
    }


def ratio(times: Dict[str, List[float]], num: str, den: str) -> Dict[str, float]:
    """``num / den``: of the medians, and the median of the per-round ratios."""
    per_round = [a / b for a, b in zip(times[num], times[den])]
    return {
        "of_medians": statistics.median(times[num]) / statistics.median(times[den]),
        "median_per_round": statistics.median(per_round),
        "p25_per_round": percentile(per_round, 0.25),
        "p75_per_round": percentile(per_round, 0.75),
    }


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_row_time(s: Dict[str, float]) -> str:
    return f"{fmt_time(s['median'])} ({fmt_time(s['p25'])}-{fmt_time(s['p75'])})"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that it runs (tests)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default per benchmark)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--profile", action="store_true", help="also print a profile of each implementation")
    p.add_argument("--device", default="cpu", help="torch device (cpu; cuda for benchmarks/gpu_bench.py)")
    return p


def device_sync(device) -> Optional[Callable[[], None]]:
    """A synchronisation callable for timing on ``device`` (None on CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return None


def setup_torch(threads: int) -> None:
    """``threads`` intra-op threads for torch and for NumPy's BLAS (OpenBLAS
    otherwise starts one thread per core for the larger products, and its
    threads' CPU time counts in the process's), one inter-op thread."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(max(1, threads), user_api="blas")


def write_json(path: Optional[str], result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)


def command_line() -> str:
    root = os.path.dirname(HERE)
    args = [os.path.relpath(a, root) if os.path.isabs(a) and a.startswith(root + os.sep) else a for a in sys.argv[1:]]
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], root)] + args)


def torch_profile(fn: Callable[[], object], calls: int = 5, top: int = 12, sort: str = "self_cpu_time_total") -> str:
    """Top entries of torch.profiler over ``calls`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    import torch

    fn()
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48)


def cprofile(fn: Callable[[], object], calls: int = 20, top: int = 15) -> str:
    """Top entries (by own time) of cProfile over ``calls`` calls of ``fn``:
    for pipelines whose time is in C calls of PIL/NumPy rather than torch ops."""
    import cProfile
    import io
    import pstats

    fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(top)
    text = s.getvalue()
    # keep the table only
    start = text.find("ncalls")
    return text[start:] if start >= 0 else text


def analyse(times: Dict[str, Dict[str, List[float]]], pairs: Sequence[Sequence[str]]) -> dict:
    """Summaries and ``num/den`` ratios (``pairs``) for wall and CPU time."""
    out = {}
    for kind, t in times.items():
        out[kind] = {
            "summary": summary(t),
            "ratios": {f"{a}/{b}": ratio(t, a, b) for a, b in pairs},
        }
    return out


def fmt_ratio(r: Dict[str, float]) -> str:
    return "%.3f (%.3f)" % (r["of_medians"], r["median_per_round"])
