#!/usr/bin/env python
"""The model zoo: every row's pretraining config, composed the way training composes it.

    python tools/model_zoo.py              # the table of all rows
    python tools/model_zoo.py --markdown   # row, published top-1, config, launch command (README)
    python tools/model_zoo.py --check      # every row's composed config against the recipes

Each row's config (``config=swav_plugin/pretrain/<row>``) is composed through
VISSL's hydra composition and the plugin's inference
(:func:`swav_vissl_plugin.config.compose`) at its published launch; every
value printed is read from that composed config, not from this file.

``--check`` compares, field by field, the composed config with the published
recipe in ``tools/model_zoo_recipes.yaml`` and exits 1 naming every row and
field that differ (or a config that does not compose). A row whose config
file does not exist yet is reported as "component pending" and does not fail
the check. ``--row NAME`` (repeatable) selects rows; extra ``config.KEY=value``
arguments are applied to the selected rows' compositions, e.g.

    python tools/model_zoo.py --check --row swav_400ep config.OPTIMIZER.num_epochs=300

prints `` 2 swav_400ep: MISMATCH epochs: recipe 400, config 300`` and exits 1.
The DeepCluster-v2 k-means iteration count is read from the loss's
``nmb_kmeans_iters`` / ``kmeans_iterations`` / ``kmeans_iters`` key
(:data:`KMEANS_KEYS`).
"""

import argparse
import functools
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

RECIPES = Path(__file__).resolve().with_name("model_zoo_recipes.yaml")
CONFIG_GROUP = "swav_plugin/pretrain"
DATA_PATH = "/path/to/imagenet/train"
NOT_CHECKED = {"row", "name", "method", "top1", "unpublished_recipe"}
#: Loss keys that may hold the k-means iteration count (the release's name first).
KMEANS_KEYS = ("nmb_kmeans_iters", "kmeans_iterations", "kmeans_iters")


# --------------------------------------------------------------------------
# the recipes
# --------------------------------------------------------------------------
def load_recipes(path: Path = RECIPES) -> List[Dict[str, Any]]:
    """Rows in table order, each = its method's shared values + its own."""
    data = yaml.safe_load(Path(path).read_text())
    rows = []
    for own in data["rows"]:
        row = dict(data["shared"][own["method"]])
        row.update(own)
        if row["gpus"] * row["batch_per_gpu"] != row["global_batch"]:
            raise ValueError(f"{path}: row {row['name']}: gpus x batch_per_gpu != global_batch")
        rows.append(row)
    return rows


def expected_fields(row: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of ``row`` the check compares, plus those derived from them."""
    exp = {k: v for k, v in row.items() if k not in NOT_CHECKED}
    exp["recipe_global_batch"] = row["global_batch"]
    exp["lr_per_256"] = row["base_lr"] * 256 / row["global_batch"]
    width = int(row["arch"].partition("w")[2] or 1)
    exp["head_in_dim"] = 2048 * width
    if not row.get("warmup_epochs"):
        exp.pop("start_warmup", None)  # unused without warmup
    if not row.get("queue_length"):
        exp.pop("epoch_queue_starts", None)  # no queue: when it would start does not matter
    return exp


# --------------------------------------------------------------------------
# a composed config, in the recipes' vocabulary
# --------------------------------------------------------------------------
def config_exists(name: str) -> bool:
    from importlib import resources

    return (resources.files("swav_vissl_plugin.configs") / "config" / CONFIG_GROUP / f"{name}.yaml").is_file()


def compose_row(name: str, overrides: Sequence[str] = ()):
    """The row's config composed (with ``overrides``); cached: treat it as read-only."""
    return _compose_row(name, tuple(overrides))


@functools.lru_cache(maxsize=None)
def _compose_row(name: str, overrides: Tuple[str, ...]):
    from swav_vissl_plugin.config import compose

    with tempfile.TemporaryDirectory() as tmp:
        _, cfg = compose(
            [f"config={CONFIG_GROUP}/{name}", f"config.CHECKPOINT.DIR={tmp}/checkpoints", *overrides],
            dump_config=False,
        )
    return cfg


def _multicrop(cfg) -> Optional[Dict[str, Any]]:
    for t in cfg.DATA.TRAIN.TRANSFORMS or []:
        if "nmb_crops" in t:
            return t
    return None


def observed_fields(cfg) -> Dict[str, Any]:
    """What ``cfg`` (composed at the published launch) trains with, as recipe fields."""
    from swav_vissl_plugin.config import WARMUP_COSINE, global_batch_size, recipe_global_batch, world_size

    loss = cfg.LOSS.get(cfg.LOSS.name) or {}
    head = cfg.MODEL.HEAD.PARAMS[0][1] if cfg.MODEL.HEAD.PARAMS else {}
    trunk = cfg.MODEL.TRUNK
    if trunk.NAME == "resnet":
        w = trunk.RESNETS.WIDTH_MULTIPLIER
        arch = f"resnet{trunk.RESNETS.DEPTH}" + (f"w{w}" if w != 1 else "")
    else:
        arch = trunk.NAME
    mc = _multicrop(cfg)
    crops = (
        [[n, s, lo, hi] for n, s, lo, hi in zip(mc["nmb_crops"], mc["size_crops"], mc["min_scale_crops"], mc["max_scale_crops"])]
        if mc
        else None
    )
    opt = cfg.OPTIMIZER
    lr = opt.param_schedulers.lr
    scaling = lr.get("auto_lr_scaling") or {}
    sync = cfg.MODEL.SYNC_BN_CONFIG
    if not sync.CONVERT_BN_TO_SYNC_BN:
        sync_bn = "off"
    elif sync.GROUP_SIZE == 0:
        sync_bn = "global"
    elif sync.GROUP_SIZE > 0:
        sync_bn = sync.GROUP_SIZE
    else:
        sync_bn = f"per node ({cfg.DISTRIBUTED.NUM_PROC_PER_NODE})"
    amp = cfg.MODEL.AMP_PARAMS
    if not amp.USE_AMP:
        precision = "none"
    elif str(amp.AMP_TYPE).lower() == "pytorch":
        precision = amp.get("DTYPE", "float16")
    else:
        precision = f"apex {dict(amp.AMP_ARGS)}"
    larc = cfg.OPTIMIZER.get("larc_config") or {}
    nmb = head.get("nmb_prototypes")
    kmeans = next((loss[k] for k in KMEANS_KEYS if k in loss), None)
    return {
        "loss": cfg.LOSS.name,
        "arch": arch,
        "head_in_dim": head.get("in_dim"),
        "hidden_mlp": head.get("hidden_mlp"),
        "feat_dim": head.get("feat_dim"),
        "nmb_prototypes": [nmb] if isinstance(nmb, int) else (list(nmb) if nmb is not None else None),
        "crops_for_assign": list(loss.get("crops_for_assign") or []),
        "temperature": loss.get("temperature"),
        "epsilon": loss.get("epsilon"),
        "sinkhorn_iterations": loss.get("sinkhorn_iterations"),
        "wd": opt.weight_decay if opt.regularize_bn and opt.regularize_bias else f"{opt.weight_decay:g}, not on BN/bias",
        "momentum": opt.momentum,
        "nesterov": opt.nesterov,
        "larc": (
            {k: larc.get(k) for k in ("trust_coefficient", "clip", "eps")}
            if opt.name == "swav_plugin_larc" and not opt.use_larc
            else f"optimizer {opt.name}"
        ),
        "lr_schedule": "warmup_cosine" if lr.get("name") == WARMUP_COSINE else lr.get("name"),
        "mixed_precision": precision,
        "seed": cfg.SEED_VALUE,
        "drop_last": cfg.DATA.TRAIN.DROP_LAST,
        "workers_per_gpu": cfg.DATA.NUM_DATALOADER_WORKERS,
        "gpus": world_size(cfg),
        "batch_per_gpu": cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        "global_batch": global_batch_size(cfg),
        "recipe_global_batch": recipe_global_batch(cfg),
        "crops": crops,
        "epochs": opt.num_epochs,
        "base_lr": lr.get("base_lr"),
        "final_lr": lr.get("final_lr"),
        "lr_per_256": (
            scaling["base_value"] * 256 / scaling["base_lr_batch_size"] if scaling.get("auto_scale") else "not scaled"
        ),
        "warmup_epochs": lr.get("warmup_epochs"),
        "start_warmup": lr.get("start_warmup"),
        "freeze_prototypes_niters": loss.get("freeze_prototypes_niters"),
        "queue_length": loss.get("queue_length"),
        "epoch_queue_starts": loss.get("epoch_queue_starts"),
        "sync_bn": sync_bn,
        "kmeans_iterations": kmeans if kmeans is not None else f"not found (looked for {', '.join(KMEANS_KEYS)})",
    }


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (type(a) is type(b) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def mismatches(row: Dict[str, Any], cfg) -> List[Tuple[str, Any, Any]]:
    """(field, recipe value, config value) for every field that differs."""
    exp, obs = expected_fields(row), observed_fields(cfg)
    return [(k, v, obs.get(k)) for k, v in exp.items() if not _same(v, obs.get(k))]


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------
def crops_text(crops) -> str:
    return " + ".join(f"{n}x{s} ({lo:g}-{hi:g})" for n, s, lo, hi in crops) if crops else "-"


def launch_command(name: str, cfg) -> str:
    cmd = (
        f"python tools/run_distributed_engines.py config={CONFIG_GROUP}/{name} "
        f"config.DATA.TRAIN.DATA_PATHS=[{DATA_PATH}] config.CHECKPOINT.DIR=/path/to/runs/{name}"
    )
    if cfg.DISTRIBUTED.NUM_NODES > 1:
        cmd += " config.SLURM.USE_SLURM=true config.SLURM.PARTITION=<partition>"
    return cmd


def table_entry(row: Dict[str, Any], cfg) -> Dict[str, str]:
    obs = observed_fields(cfg)
    method = {"swav_plugin_loss": "SwAV"}.get(obs["loss"], row["method"])
    q = obs["queue_length"]
    return {
        "#": str(row["row"]),
        "row": row["name"] + (" (recipe unpublished)" if row.get("unpublished_recipe") else ""),
        "method": method,
        "arch": obs["arch"],
        "epochs": str(obs["epochs"]),
        "global batch": f"{obs['global_batch']} ({obs['gpus']}x{obs['batch_per_gpu']})",
        "crops": crops_text(obs["crops"]),
        "LR": f"{obs['base_lr']:g} -> {obs['final_lr']:g}",
        "queue": f"{q} (epoch {obs['epoch_queue_starts']})" if q else "-",
        "top-1": f"{row['top1']:.1f}",
        "config": f"config={CONFIG_GROUP}/{row['name']}",
        "launch": launch_command(row["name"], cfg),
    }


def pending_entry(row: Dict[str, Any]) -> Dict[str, str]:
    return {
        "#": str(row["row"]),
        "row": row["name"],
        "method": row["method"],
        "arch": row["arch"],
        "epochs": str(row["epochs"]),
        "global batch": f"{row['global_batch']} ({row['gpus']}x{row['batch_per_gpu']})",
        "crops": crops_text(row.get("crops")),
        "LR": f"{row['base_lr']:g} -> {row['final_lr']:g}",
        "queue": "-",
        "top-1": f"{row['top1']:.1f}",
        "config": "component pending (no config yet; values from the recipes file)",
        "launch": "-",
    }


def print_table(entries: List[Dict[str, str]], columns: Sequence[str], markdown: bool = False) -> None:
    if markdown:

        def cell(text: str) -> str:
            text = text.replace("|", "\\|")
            return f"`{text}`" if text.startswith(("config=", "python ")) else text

        print("| " + " | ".join(columns) + " |")
        print("| " + " | ".join("---" for _ in columns) + " |")
        for e in entries:
            print("| " + " | ".join(cell(e[c]) for c in columns) + " |")
        return
    widths = {c: max(len(c), *(len(e[c]) for e in entries)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for e in entries:
        print("  ".join(e[c].ljust(widths[c]) for c in columns))


# --------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare every row's composed config with the recipes")
    parser.add_argument("--markdown", action="store_true", help="README table: row, top-1, config, launch command")
    parser.add_argument("--row", action="append", default=[], help="only this row (repeatable)")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("config.")]
    if bad:
        parser.error(f"unknown arguments {bad} (overrides look like config.KEY=value)")

    import logging

    import swav_vissl_plugin  # noqa: F401  (registration)
    from swav_vissl_plugin.config import ConfigError

    plugin_logger = logging.getLogger("swav_vissl_plugin")
    level = plugin_logger.level
    plugin_logger.setLevel(logging.ERROR)  # the table says it all
    try:
        return _run(args, overrides, parser, ConfigError)
    finally:
        plugin_logger.setLevel(level)


def _run(args, overrides, parser, ConfigError) -> int:
    rows = load_recipes(args.recipes)
    unknown = set(args.row) - {r["name"] for r in rows}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}")
    if args.row:
        rows = [r for r in rows if r["name"] in args.row]

    entries, failures, report = [], 0, []
    for row in rows:
        name = row["name"]
        if not config_exists(name):
            entries.append(pending_entry(row))
            report.append(f"{row['row']:>2} {name}: component pending (config {CONFIG_GROUP}/{name}.yaml not found)")
            continue
        try:
            cfg = compose_row(name, overrides)
        except ConfigError as e:
            failures += 1
            report.append(f"{row['row']:>2} {name}: MISMATCH: the config does not compose: {e}")
            continue
        entries.append(table_entry(row, cfg))
        if args.check:
            diff = mismatches(row, cfg)
            if diff:
                failures += 1
                for field, want, got in diff:
                    report.append(f"{row['row']:>2} {name}: MISMATCH {field}: recipe {want!r}, config {got!r}")
            else:
                report.append(f"{row['row']:>2} {name}: ok ({len(expected_fields(row))} fields)")

    if args.markdown:
        print_table(entries, ["row", "top-1", "config", "launch"], markdown=True)
    elif not args.check:
        print_table(entries, ["#", "row", "method", "arch", "epochs", "global batch", "crops", "LR", "queue", "top-1", "config", "launch"])
    if args.check or failures:
        print("\n".join(report))
        print(f"model zoo check: {'FAILED' if failures else 'ok'} ({failures} row(s) differ from the recipes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
