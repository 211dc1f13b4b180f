"""A plain PyTorch SwAV training loop, independent of the plugin and of VISSL.

Written from the paper's description and the recipe text (docs/recipe.md;
docs/small_data.md for the small-image values): torchvision's transforms for
the multi-crop augmentations, its own small CNN, projection head and
prototypes, its own Sinkhorn-Knopp, swapped-prediction loss, LARC, warmup +
cosine schedule and prototype freezing. It imports nothing of
``swav_vissl_plugin``, so a defect anywhere on the plugin's training path
(data, model, hooks, optimizer, schedule) shows as a gap between the two runs
in ``tests/test_learning_guard.py``.

    python tests/plain_swav.py --train FOLDER --val FOLDER [--epochs 16 ...]

prints one JSON line per epoch (loss, kNN top-1) and a final JSON line with
the kNN and linear-probe top-1 and the prototypes in use on ``--val``.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)

# The small-image recipe (docs/small_data.md), written out here rather than
# read from the plugin's YAML so that a wrong value there shows as a gap.
RECIPE: Dict[str, object] = {
    "nmb_crops": (2, 4),
    "size_crops": (28, 14),
    "min_scale_crops": (0.5, 0.2),
    "max_scale_crops": (1.0, 0.5),
    "blur_radius_fraction": (0.0036, 0.071),  # x crop size: U(0.1, 2.0) px at 28 px
    "flip_p": 0.5,
    "widths": (32, 64, 128),
    "hidden_mlp": 512,
    "feat_dim": 64,
    "nmb_prototypes": 100,
    "batch_size": 64,
    "epsilon": 0.03,
    "temperature": 0.1,
    "sinkhorn_iterations": 3,
    "crops_for_assign": (0, 1),
    "freeze_prototypes_niters": 62,
    "base_lr": 4.8,
    "final_lr": 0.0048,
    "warmup_epochs": 1,
    "start_warmup": 0.3,
    "weight_decay": 1e-6,
    "epochs": 34,
}


# ------------------------------------------------------------------ data
class GaussianBlurPIL:
    """PIL's Gaussian blur with probability ``p``, radius ``U(lo, hi) x size``."""

    def __init__(self, p: float, fraction: Tuple[float, float], size: int):
        self.p, self.lo, self.hi = p, fraction[0] * size, fraction[1] * size

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def crop_pipelines(recipe: Dict[str, object]) -> List[T.Compose]:
    """One torchvision pipeline per crop, in crop order."""
    out = []
    for n, size, lo, hi in zip(recipe["nmb_crops"], recipe["size_crops"],
                               recipe["min_scale_crops"], recipe["max_scale_crops"]):
        pipe = T.Compose([
            T.RandomResizedCrop(size, scale=(lo, hi)),
            T.RandomHorizontalFlip(p=recipe["flip_p"]),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            GaussianBlurPIL(0.5, recipe["blur_radius_fraction"], size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])
        out.extend([pipe] * n)
    return out


def read_folder(folder: Path) -> Tuple[List[Image.Image], torch.Tensor]:
    """RGB images and integer labels of a ``<label>/<image>`` folder, sorted."""
    images, labels = [], []
    for label_dir in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        if label_dir.is_dir():
            for f in sorted(label_dir.iterdir()):
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
                labels.append(int(label_dir.name))
    return images, torch.tensor(labels)


class MultiCropSet(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[Image.Image], pipes: Sequence[T.Compose]):
        self.images, self.pipes = images, pipes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> List[torch.Tensor]:
        return [p(self.images[i]) for p in self.pipes]


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def whole_images(images: Sequence[Image.Image]) -> torch.Tensor:
    x = torch.stack([T.functional.to_tensor(im) for im in images])
    return T.functional.normalize(x, MEAN, STD)


# ------------------------------------------------------------------ model
def conv_bn(cin: int, cout: int, k: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(*conv_bn(cin, cout, 3, 2), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3, 1))
        self.skip = nn.Sequential(*conv_bn(cin, cout, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.main(x) + self.skip(x))


class SwAVNet(nn.Module):
    """Trunk (stem + 3 residual stages + pooling), MLP head, prototypes."""

    def __init__(self, widths: Sequence[int], hidden: int, dim: int, k: int):
        super().__init__()
        w0, w1, w2 = widths
        self.trunk = nn.Sequential(
            *conv_bn(3, w0, 3, 1), nn.ReLU(inplace=True),
            Residual(w0, w0), Residual(w0, w1), Residual(w1, w2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(w2, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, dim))
        self.prototypes = nn.Linear(dim, k, bias=False)

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scores ``(sum of crop batches, K)``."""
        return self.prototypes(self.embed(crops))

    def embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2-normalised embeddings ``(sum of crop batches, dim)``, crops in
        order, crops of one size batched together."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            x = torch.cat(crops[start:end]).contiguous(memory_format=torch.channels_last)
            feats.append(self.trunk(x))
            start = end
        return F.normalize(self.head(torch.cat(feats)), dim=1)


# ------------------------------------------------------------------ SwAV
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Equipartitioned soft codes (B, K); each row sums to 1."""
    q = torch.exp((scores - scores.max()) / epsilon)
    q /= q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=0, keepdim=True) * k  # every prototype gets mass 1/K
        q /= q.sum(dim=1, keepdim=True) * b  # every sample gets mass 1/B
    return q * b


def swav_loss(scores: torch.Tensor, n_crops: int, assign: Sequence[int], temperature: float,
              epsilon: float, iterations: int) -> torch.Tensor:
    b = scores.shape[0] // n_crops
    chunks = scores.split(b)
    total = 0.0
    for a in assign:
        q = sinkhorn(chunks[a].detach(), epsilon, iterations)
        others = [F.log_softmax(chunks[v] / temperature, dim=1) for v in range(n_crops) if v != a]
        total = total + sum(-(q * lp).sum(dim=1).mean() for lp in others) / len(others)
    return total / len(assign)


def lr_at(it: int, iters_per_epoch: int, r: Dict[str, object]) -> float:
    warm = int(r["warmup_epochs"]) * iters_per_epoch
    total = int(r["epochs"]) * iters_per_epoch
    if it < warm:
        return float(np.linspace(r["start_warmup"], r["base_lr"], warm)[it])
    t = (it - warm) / (total - warm)
    return r["final_lr"] + 0.5 * (r["base_lr"] - r["final_lr"]) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def larc_(params: Sequence[nn.Parameter], weight_decay: float, trust: float = 0.001, eps: float = 1e-8) -> None:
    """Apex-style LARC without clipping: decay into the gradient, then scale it
    by ``trust ||w|| / (||g|| + wd ||w|| + eps)``, where both norms are
    non-zero (elsewhere the gradient is left as it is)."""
    for p in params:
        if p.grad is None:
            continue
        w_norm, g_norm = p.norm(), p.grad.norm()
        if w_norm > 0 and g_norm > 0:
            ratio = trust * w_norm / (g_norm + weight_decay * w_norm + eps)
            p.grad.add_(p, alpha=weight_decay).mul_(ratio)


def larc_sgd_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], r: Dict[str, object], it: int,
                  iters_per_epoch: int) -> None:
    """LARC on the gradients, then momentum SGD at the schedule's LR of step ``it``."""
    larc_(params, float(r["weight_decay"]))
    for g in opt.param_groups:
        g["lr"] = lr_at(it, iters_per_epoch, r)
    opt.step()


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    trunk.eval()
    out = torch.cat([trunk(x[i:i + 500]) for i in range(0, len(x), 500)])
    trunk.train()
    return out


def knn_top1(train_f, train_y, val_f, val_y, k: int = 20, temperature: float = 0.07) -> float:
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    sim, idx = (val_f @ train_f.t()).topk(k, dim=1)
    votes = torch.zeros(len(val_f), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return 100.0 * (votes.argmax(1) == val_y).float().mean().item()


def linear_top1(train_f, train_y, val_f, val_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(train_f.numpy())
    clf = LogisticRegression(max_iter=2000).fit(s.transform(train_f.numpy()), train_y.numpy())
    return 100.0 * float((clf.predict(s.transform(val_f.numpy())) == val_y.numpy()).mean())


# ------------------------------------------------------------------ training
def prepare(train_dir: Path, val_dir: Path, r: Dict[str, object], seed: int, workers: int,
            dataset=MultiCropSet) -> Dict[str, object]:
    """Seeds, both folders (whole images for the evaluation) and the
    multi-crop loader over ``dataset(train images, crop pipelines)``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    t0 = time.time()
    train_imgs, train_y = read_folder(train_dir)
    val_imgs, val_y = read_folder(val_dir)
    loader = torch.utils.data.DataLoader(
        dataset(train_imgs, crop_pipelines(r)), batch_size=int(r["batch_size"]), shuffle=True,
        drop_last=True, num_workers=workers, worker_init_fn=seed_worker, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return {"t0": t0, "loader": loader, "n_train": len(train_imgs), "train_x": whole_images(train_imgs),
            "train_y": train_y, "val_x": whole_images(val_imgs), "val_y": val_y}


def end_epoch(trunk: nn.Module, data: Dict[str, object], history: List[dict], log, **row) -> None:
    """Append the epoch's row (``row`` + kNN top-1 + seconds so far) and log it."""
    row["knn_top1"] = knn_top1(features(trunk, data["train_x"]), data["train_y"],
                               features(trunk, data["val_x"]), data["val_y"])
    row["seconds"] = time.time() - data["t0"]
    history.append(row)
    log(json.dumps(row))


def finish(model: nn.Module, prototypes: torch.Tensor, data: Dict[str, object], history: List[dict],
           r: Dict[str, object]) -> Dict[str, object]:
    """kNN and linear top-1 of the final trunk, and the prototypes (rows of
    ``prototypes``, unit norm) that are the argmax of >= 1 held-out image."""
    f_train, f_val = features(model.trunk, data["train_x"]), features(model.trunk, data["val_x"])
    with torch.no_grad():
        model.eval()
        z = F.normalize(model.head(f_val), dim=1)
        used = int(torch.unique((z @ prototypes.t()).argmax(1)).numel())
    return {
        "knn_top1": knn_top1(f_train, data["train_y"], f_val, data["val_y"]),
        "linear_top1": linear_top1(f_train, data["train_y"], f_val, data["val_y"]),
        "prototypes_used": used,
        "final_loss": history[-1]["last_loss"],
        "seconds": time.time() - data["t0"],
        "history": history,
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()},
    }


def train(train_dir: Path, val_dir: Path, recipe: Dict[str, object], seed: int = 0,
          workers: int = 1, log=print) -> Dict[str, object]:
    r = {**RECIPE, **recipe}
    data = prepare(train_dir, val_dir, r, seed, workers)
    loader = data["loader"]
    model = SwAVNet(r["widths"], int(r["hidden_mlp"]), int(r["feat_dim"]), int(r["nmb_prototypes"]))
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    n_crops, ipe = sum(r["nmb_crops"]), len(loader)
    log_k = math.log(int(r["nmb_prototypes"]))
    it, history = 0, []
    for epoch in range(int(r["epochs"])):
        losses = []
        for crops in loader:
            with torch.no_grad():
                model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
            scores = model(crops)
            loss = swav_loss(scores, n_crops, r["crops_for_assign"], r["temperature"], r["epsilon"],
                             int(r["sinkhorn_iterations"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if it < int(r["freeze_prototypes_niters"]):
                model.prototypes.weight.grad = None
            larc_sgd_step(opt, params, r, it, ipe)
            losses.append(loss.item())
            it += 1
        end_epoch(model.trunk, data, history, log, epoch=epoch, loss=float(np.mean(losses)),
                  last_loss=losses[-1], ln_k=log_k)
    return finish(model, F.normalize(model.prototypes.weight.detach(), dim=1), data, history, r)


def run_cli(argv: Sequence[str], doc: str, recipe_defaults: Dict[str, object], train_fn) -> int:
    """A plain loop's command line: folders, seed, workers, ``--set KEY=JSON``
    overrides of ``recipe_defaults``; prints the result without its history."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--val", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a recipe value, e.g. --set epochs=12 --set size_crops=[28,14]")
    a = p.parse_args(argv)
    recipe = {}
    for item in a.set:
        key, value = item.split("=", 1)
        if key not in recipe_defaults:
            p.error(f"unknown recipe key {key!r}; known: {', '.join(recipe_defaults)}")
        value = json.loads(value)
        recipe[key] = tuple(value) if isinstance(value, list) else value
    result = train_fn(a.train, a.val, recipe, a.seed, a.workers)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return 0


def main(argv: Sequence[str] = None) -> int:
    return run_cli(argv, __doc__, RECIPE, train)


if __name__ == "__main__":
    sys.exit(main())
