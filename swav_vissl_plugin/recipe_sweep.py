"""Robustness sweep of a SwAV recipe: is the recipe in a stable neighbourhood?

Trains a config (by default ``swav_plugin/pretrain/swav_small_images`` on the
quickstart's MNIST split, or on a user's own labelled image folders) at every
point of a grid of

* ``lr_factor``: the config's learning rate (``base_lr``, ``final_lr``,
  ``start_warmup`` and ``auto_lr_scaling.base_value`` together) times
  1/4, 1 and 4;
* ``epsilon``: Sinkhorn's entropic regularisation;
* ``batch``: ``DATA.TRAIN.BATCHSIZE_PER_REPLICA``; the config's scaling rules
  then restate the LR (per 256 images) and ``freeze_prototypes_niters``
  (same number of images) for it, as for any launch at another batch;

and reports, for each run: kNN top-1 (the monitor's, k = 20, T = 0.07, last
epoch), linear-probe top-1 on the validation folder, prototypes in use on it
(argmax of at least one image), the final training loss against ln K, and
whether the collapse warning fired (first iteration, signals, causes the
warning marked for the run). Writes ``sweep.json``, ``sweep.md`` (the table)
and ``knn_curves.png`` into the output folder; each run's checkpoints, logs
and gallery under ``runs/<name>/``. docs/small_data.md shows the table of the
small-image recipe.

Runs go one after the other by default; ``jobs`` > 1 runs that many at a
time, each with ``OMP_NUM_THREADS = cores / jobs``.
"""

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from swav_vissl_plugin.quickstart import (
    collapse_warnings,
    labelled_run_overrides,
    learning_summary,
    load_split,
    parallel_env,
    pretrain,
    probe,
    read_knn_log,
    read_training_log,
)

DEFAULT_CONFIG = "swav_plugin/pretrain/swav_small_images"
LR_FACTORS = (0.25, 1.0, 4.0)
EPSILONS = (0.03, 0.05)
BATCHES = (64, 256)
LR_KEY = "config.OPTIMIZER.param_schedulers.lr"


def grid(lr_factors: Sequence[float], epsilons: Sequence[float], batches: Sequence[int]) -> List[Dict[str, Any]]:
    """Every combination, each with a folder-safe ``name``."""
    return [
        {"lr_factor": float(f), "epsilon": float(e), "batch": int(b),
         "name": f"lr{f:g}x_eps{e:g}_b{int(b)}"}
        for f, e, b in itertools.product(lr_factors, epsilons, batches)
    ]


def point_overrides(config, point: Mapping) -> List[str]:
    """Overrides that train ``config`` (the composed base) at ``point``."""
    lr = config.OPTIMIZER.param_schedulers.lr
    f = point["lr_factor"]
    ref = config.SWAV_PLUGIN.get("RECIPE_LR") or [lr.base_lr, lr.final_lr]  # the file's values, before scaling
    out = [
        f"{LR_KEY}.base_lr={ref[0] * f:.8g}",
        f"{LR_KEY}.final_lr={ref[1] * f:.8g}",
        f"{LR_KEY}.start_warmup={lr.start_warmup * f:.8g}",
        f"config.LOSS.{config.LOSS.name}.epsilon={point['epsilon']:g}",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={point['batch']}",
    ]
    if lr.auto_lr_scaling.auto_scale:
        out.append(f"{LR_KEY}.auto_lr_scaling.base_value={lr.auto_lr_scaling.base_value * f:.8g}")
    return out


def evaluate_run(config, run_dir: Path, splits: Dict[str, Path], data, checkpoint: Path) -> Dict[str, Any]:
    """kNN, linear probe, prototypes in use, final loss and collapse warnings
    of one finished run (``data``: both splits as :func:`load_split` gives)."""
    from swav_vissl_plugin.gallery import make_gallery

    ckpt_dir = run_dir / "checkpoints"
    knn = read_knn_log(ckpt_dir)
    gallery = make_gallery(checkpoint, splits["val"], run_dir / "prototype_gallery", config=config)
    summary = learning_summary(knn, read_training_log(ckpt_dir), gallery, collapse_warnings(ckpt_dir))
    warnings = summary.pop("collapse_warnings")
    return {
        **summary,
        "knn_curve": [[r["train_phase_idx"], r["knn_top1"]] for r in knn],
        "linear_top1": probe(config, checkpoint, data),
        "collapse_warning": bool(warnings),
        "collapse_iteration": warnings[0]["iteration"] if warnings else None,
        "collapse_signals": warnings[0]["signals"] if warnings else None,
        "collapse_causes": warnings[0]["marked_causes"] if warnings else [],
    }


def markdown_table(rows: Sequence[Mapping]) -> str:
    head = ("| LR | epsilon | batch | kNN top-1 | linear top-1 | prototypes used | final loss (ln K) "
            "| collapse warning |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        warn = "no"
        if r["collapse_warning"]:
            causes = "; ".join(c.split(" [this run: ")[0].split(" (")[0] for c in r["collapse_causes"]) or "none marked"
            warn = f"yes, iteration {r['collapse_iteration']} ({causes})"
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.1f} %"
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f} ({r['ln_k']:.3f})"
        lines.append(
            f"| x{r['lr_factor']:g} | {r['epsilon']:g} | {r['batch']} | {knn} | {r['linear_top1']:.1f} % "
            f"| {r['prototypes_used']}/{r['num_prototypes']} | {loss} | {warn} |"
        )
    return "\n".join(lines) + "\n"


def plot_knn_curves(rows: Sequence[Mapping], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sorted({r["batch"] for r in rows})), figsize=(12, 4.2), squeeze=False,
                             sharey=True)  # one scale: the batches compare
    for ax, batch in zip(axes[0], sorted({r["batch"] for r in rows})):
        for r in rows:
            if r["batch"] == batch and r["knn_curve"]:
                epochs, top1 = zip(*r["knn_curve"])
                style = "--" if r["collapse_warning"] else "-"
                ax.plot([e + 1 for e in epochs], top1, style, marker="o", ms=3,
                        label=f"LR x{r['lr_factor']:g}, eps {r['epsilon']:g}")
        ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title=f"batch {batch} (dashed: collapse warning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def sweep(
    output_dir: Path,
    splits: Dict[str, Path],
    config_name: str = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    lr_factors: Sequence[float] = LR_FACTORS,
    epsilons: Sequence[float] = EPSILONS,
    batches: Sequence[int] = BATCHES,
    jobs: int = 1,
) -> List[Dict[str, Any]]:
    """Train every grid point (``splits``: labelled ``train`` and ``val``
    image folders), evaluate it, write the table, JSON and curves; returns
    the rows. A run whose folder already holds its results is not retrained."""
    from swav_vissl_plugin.config import compose

    output_dir = Path(output_dir).resolve()
    base = labelled_run_overrides(config_name, splits, overrides)
    _, config = compose(base, dump_config=False)  # a bad override stops here, before any run
    points = grid(lr_factors, epsilons, batches)
    data = {split: load_split(splits[split]) for split in ("train", "val")}  # once, for every run's probe
    env, _ = parallel_env(jobs)

    def one(point: Dict[str, Any]) -> Dict[str, Any]:
        run_dir = output_dir / "runs" / point["name"]
        done = run_dir / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg, seconds, ckpt = pretrain([*base, *point_overrides(config, point)], run_dir / "checkpoints",
                                      tag=f"sweep {point['name']}", env=env)
        row = {**point, **evaluate_run(cfg, run_dir, splits, data, ckpt), "seconds": seconds}
        done.write_text(json.dumps(row, indent=1))
        return row

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        rows = list(pool.map(one, points))
    (output_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    caption = f"`{config_name}`" + "".join(f", `{o}`" for o in overrides)
    epochs = config.OPTIMIZER.num_epochs
    (output_dir / "sweep.md").write_text(f"Recipe sweep of {caption} ({epochs} epochs); LR as a factor of "
                                         f"the config's.\n\n{markdown_table(rows)}")
    plot_knn_curves(rows, output_dir / "knn_curves.png")
    return rows
