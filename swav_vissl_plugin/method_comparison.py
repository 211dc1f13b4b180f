"""SwAV, DeepCluster-v2 and SeLa-v2 side by side on the quickstart's data.

Runs the quickstart (:func:`swav_vissl_plugin.quickstart.run`: the method's
small-image recipe, then the linear probe, kNN monitor and prototype
gallery) for every method and seed, each in its own process with its own
output folder ``<output>/<method>-seed<seed>/`` and log
(``quickstart.log`` there), ``jobs`` at a time with ``OMP_NUM_THREADS =
cores / jobs`` each. Then writes ``comparison.json`` (every run's metrics
summary) and ``comparison.md``: one row per run and, per method, the worst
seed against the method's quality bar (:data:`BARS`). docs/small_data.md
shows the table of the small-image recipes.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from swav_vissl_plugin.quickstart import METHODS, parallel_env, prepare_image_folder, quickstart_overrides

#: the quality bar of each method's quickstart on the held-out images, on the
#: worst of its seeds (README, "Three methods side by side"): linear-probe and
#: kNN top-1 (%), and, for the clustering methods, no cluster empty in two
#: epochs running.
BARS: Dict[str, Dict[str, Any]] = {
    "swav": {"linear": 97.0, "knn": 95.0, "empty_epochs_max": None},
    "deepclusterv2": {"linear": 95.0, "knn": 92.0, "empty_epochs_max": 1},
    "selav2": {"linear": 95.0, "knn": 92.0, "empty_epochs_max": 1},
}
# One quickstart run in its own process (its own threads, logs, VISSL state):
# argv = method, output folder, overrides.
RUN_ONE = "import sys; from swav_vissl_plugin.quickstart import run; run(sys.argv[2], sys.argv[3:], method=sys.argv[1])"


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{int(seed)}"


def row(method: str, seed: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """The table's values of one run's ``metrics.json``."""
    clusters = metrics.get("clusters") or {}
    return {
        "method": method,
        "seed": int(seed),
        "linear": metrics["linear_probe_top1"]["pretrained"],
        "linear_random_init": metrics["linear_probe_top1"]["random_init"],
        "knn": metrics.get("knn_top1"),
        "prototypes_used": metrics["prototypes_used"],
        "num_prototypes": metrics["num_prototypes"],
        "empty_epochs_max": clusters.get("empty_epochs_max"),
        "empty_last_epoch": clusters.get("empty_last_epoch"),
        "final_loss": metrics.get("final_loss"),
        "ln_k": metrics["ln_k"],
        "collapse_warnings": len(metrics.get("collapse_warnings") or []),
        "pretrain_seconds": metrics["pretrain_seconds"],
        "total_seconds": metrics["total_seconds"],
    }


def method_verdicts(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per method, in :data:`METHODS` order: the worst seed's linear and kNN
    top-1, fewest prototypes in use, longest empty-cluster run, slowest
    pretraining, and whether the worst seed clears :data:`BARS`."""
    out = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        bar = BARS[method]
        knns = [r["knn"] for r in mine if r["knn"] is not None]
        empties = [r["empty_epochs_max"] for r in mine if r["empty_epochs_max"] is not None]
        v = {
            "method": method,
            "seeds": [r["seed"] for r in mine],
            "linear_worst": min(r["linear"] for r in mine),
            "linear_mean": sum(r["linear"] for r in mine) / len(mine),
            "knn_worst": min(knns) if knns else None,
            "knn_mean": sum(knns) / len(knns) if knns else None,
            "prototypes_used_min": min(r["prototypes_used"] for r in mine),
            "num_prototypes": mine[0]["num_prototypes"],
            "empty_epochs_max": max(empties) if empties else None,
            "pretrain_seconds_max": max(r["pretrain_seconds"] for r in mine),
            "bar": bar,
        }
        ok = v["linear_worst"] >= bar["linear"] and v["knn_worst"] is not None and v["knn_worst"] >= bar["knn"]
        if bar["empty_epochs_max"] is not None:
            ok = ok and v["empty_epochs_max"] is not None and v["empty_epochs_max"] <= bar["empty_epochs_max"]
        v["clears_bar"] = ok
        out.append(v)
    return out


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[Mapping[str, Any]], verdicts: Sequence[Mapping[str, Any]], threads: int) -> str:
    lines = [
        "| method | seed | linear probe | kNN | prototypes in use | empty clusters (epochs in a row, most) "
        "| final loss (ln K) | collapse warnings | wall time: pretraining (whole run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['linear']:.1f} % | {_fmt(r['knn'])} % "
            f"| {r['prototypes_used']}/{r['num_prototypes']} | {_fmt(r['empty_epochs_max'], 'd')} "
            f"| {_fmt(r['final_loss'], '.3f')} ({r['ln_k']:.3f}) | {r['collapse_warnings']} "
            f"| {r['pretrain_seconds']:.0f} s ({r['total_seconds']:.0f} s) |"
        )
    lines += [
        "",
        f"Worst seed per method against its bar (pretraining with {threads} thread(s) per run):",
        "",
        "| method | seeds | linear probe, worst (mean) | kNN, worst (mean) | prototypes in use, fewest "
        "| empty clusters, most epochs in a row | slowest pretraining | bar | clears it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in verdicts:
        bar = v["bar"]
        bar_text = f"linear >= {bar['linear']:g}, kNN >= {bar['knn']:g}" + (
            f", empty <= {bar['empty_epochs_max']} epoch" if bar["empty_epochs_max"] is not None else "")
        lines.append(
            f"| {v['method']} | {len(v['seeds'])} | {v['linear_worst']:.1f} % ({v['linear_mean']:.1f}) "
            f"| {_fmt(v['knn_worst'])} % ({_fmt(v['knn_mean'])}) "
            f"| {v['prototypes_used_min']}/{v['num_prototypes']} | {_fmt(v['empty_epochs_max'], 'd')} "
            f"| {v['pretrain_seconds_max']:.0f} s | {bar_text} | {'yes' if v['clears_bar'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def compare(output_dir: Path, methods: Sequence[str] = tuple(METHODS), seeds: Sequence[int] = (0, 1, 2),
            jobs: int = 1, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train and evaluate every ``(method, seed)``, then write the table
    (``overrides``: for every run, checked for every method before any run
    starts). A run whose ``metrics.json`` exists already is read, not trained again
    (delete its folder to redo it); a failed run stops the comparison with
    its log named."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--method {', '.join(unknown)}: expected any of {', '.join(METHODS)}")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    jobs = max(1, int(jobs))
    env, threads = parallel_env(jobs)
    plan = [(m, int(s)) for m in methods for s in seeds]
    # Written once here, where every run finds it (each run's data folder is
    # its output's parent's quickstart-data), before runs start side by side.
    splits = prepare_image_folder(output_dir / "quickstart-data")
    # A bad override stops here, naming the key, before any run starts.
    from swav_vissl_plugin.config import compose

    for method in methods:
        compose(quickstart_overrides(method, splits, overrides), dump_config=False)

    def one(item) -> Dict[str, Any]:
        method, seed = item
        run_dir = output_dir / run_name(method, seed)
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "quickstart.log", "w") as log:
                proc = subprocess.run(
                    [sys.executable, "-c", RUN_ONE, method, str(run_dir), f"config.SEED_VALUE={seed}", *overrides],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                )
            if proc.returncode != 0:
                raise RuntimeError(f"{run_name(method, seed)} failed (exit code {proc.returncode}); "
                                   f"see {run_dir / 'quickstart.log'}")
        print(f"[compare] {run_name(method, seed)} done: {run_dir}", flush=True)
        return row(method, seed, json.loads(metrics_path.read_text()))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one, plan))
    verdicts = method_verdicts(rows)
    result = {"threads_per_run": threads, "jobs": jobs, "runs": rows, "methods": verdicts}
    (output_dir / "comparison.json").write_text(json.dumps(result, indent=2))
    table = markdown(rows, verdicts, threads)
    (output_dir / "comparison.md").write_text(table)
    print(table, flush=True)
    return result
