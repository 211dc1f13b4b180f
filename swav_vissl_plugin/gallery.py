"""Prototype gallery: which images each prototype stands for.

From a VISSL checkpoint of a plugin run (``swav_plugin_head``) and an image
folder:

* every image's *full view* (RGB, shorter side resized to ``resize``, centre
  crop ``crop``; by default both the first size of the run's
  ``SwavPluginMultiCrop.size_crops``, normalised with the transform's
  mean/std) goes through the trunk and the projection head; its *assignment
  score* to prototype ``k`` is ``cos(z, w_k)``: the dot product of the
  L2-normalised embedding and the L2-normalised prototype (the head's score,
  as the plugin keeps prototypes unit-norm);
* each image is *assigned* to its highest-scoring prototype;
* per prototype: the ``top`` images of highest score (over all images), the
  number of images assigned and, when the folder has class sub-folders
  (``<root>/<class>/<image>``), the *purity*: the fraction of its assigned
  images that belong to their most frequent class (``None`` when nothing is
  assigned), and that class.

Outputs in ``output_dir``:

* ``prototype_gallery.png``: one row per chosen prototype (by default the
  ``num_prototypes`` with the most assigned images), its ``top`` images
  left to right by decreasing score, each as a ``tile x tile`` square, with a
  label column (prototype id, images assigned, purity). Size: width
  ``label_width + cols x tile + (cols + 1) x pad``, height ``rows x tile +
  (rows + 1) x pad``, ``cols = min(top, images)``;
* ``prototype_gallery.html``: every prototype: a table (assigned, purity,
  majority class, linked) and one section per prototype
  (``id="prototype-<k>"``) with its strip of top images
  (``prototype_gallery_files/prototype_<k>.png``);
* ``prototype_gallery.json``: the same numbers.

:func:`make_gallery` does it all; ``tools/prototype_gallery.py`` is its
command line.
"""

import html
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from swav_vissl_plugin.knn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    _trunk_output,
    list_image_folder,
)

__all__ = [
    "resolve_checkpoint",
    "load_train_config",
    "load_model",
    "full_view_settings",
    "assignment_scores",
    "top_images",
    "prototype_stats",
    "grid_size",
    "render_grid",
    "make_gallery",
]

PNG_NAME = "prototype_gallery.png"
HTML_NAME = "prototype_gallery.html"
JSON_NAME = "prototype_gallery.json"
FILES_DIR = "prototype_gallery_files"


# --------------------------------------------------------------- checkpoints
def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or in a checkpoint folder: the last
    ``model_final_checkpoint_phase*.torch``, else ``checkpoint.torch``, else
    the newest ``model_*.torch``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    finals = sorted(path.glob("model_final_checkpoint_phase*.torch"))
    if finals:
        return finals[-1]
    if (path / "checkpoint.torch").exists():
        return (path / "checkpoint.torch").resolve()
    others = sorted(path.glob("model_*.torch"), key=lambda p: p.stat().st_mtime)
    if not others:
        raise FileNotFoundError(f"no VISSL checkpoint (*.torch) in {path}")
    return others[-1]


def load_train_config(path):
    """VISSL's ``train_config.yaml`` (the composed config a run writes into
    its checkpoint folder) as an ``AttrDict``."""
    import yaml
    from vissl.config import AttrDict

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "MODEL" not in data:
        raise ValueError(f"{path} is not a VISSL config (no MODEL)")
    return AttrDict(data)


def load_model(checkpoint, config=None) -> Tuple[torch.nn.Module, Any, Path]:
    """The run's model (eval mode, CPU) with the checkpoint's weights.

    ``config``: an ``AttrDict``/dict config, a path to a YAML file, or None
    for ``train_config.yaml`` next to the checkpoint. Returns ``(model,
    config, checkpoint file)``."""
    import swav_vissl_plugin  # noqa: F401  (registration of trunk and head)
    from vissl.config import AttrDict
    from vissl.models import build_model

    ckpt = resolve_checkpoint(checkpoint)
    if config is None:
        candidates = [ckpt.parent / "train_config.yaml", Path(checkpoint) / "train_config.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no train_config.yaml next to {ckpt}: pass the config")
        config = load_train_config(found)
    elif isinstance(config, (str, Path)):
        config = load_train_config(config)
    elif not isinstance(config, AttrDict):
        config = AttrDict(dict(config))
    model = build_model(config["MODEL"], config["OPTIMIZER"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.set_classy_state(state["classy_state_dict"]["base_model"])
    head = model.heads[0]
    if not hasattr(head, "prototype_layers"):
        raise ValueError(f"{ckpt}: the model's first head is {type(head).__name__}, not swav_plugin_head")
    model.eval()
    return model, config, ckpt


def full_view_settings(config) -> Dict[str, Any]:
    """``resize``, ``crop``, ``mean``, ``std`` of the full view: the first
    ``size_crops`` entry and the normalisation of the config's
    ``SwavPluginMultiCrop`` transform (None/ImageNet values without one)."""
    out = {"resize": None, "crop": None, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    try:
        transforms = config["DATA"]["TRAIN"]["TRANSFORMS"]
    except (KeyError, TypeError):
        return out
    for t in transforms or []:
        if t.get("name") == "SwavPluginMultiCrop":
            sizes = t.get("size_crops")
            if sizes:
                out["resize"] = out["crop"] = int(sizes[0])
            out["mean"] = list(t.get("mean") or out["mean"])
            out["std"] = list(t.get("std") or out["std"])
    return out


# ------------------------------------------------------------------- scores
@torch.no_grad()
def embed_and_score(model, x: torch.Tensor, head_index: int = 0) -> torch.Tensor:
    """``(B, K)`` assignment scores of a batch: cosine of the L2-normalised
    projection of the trunk's features and each L2-normalised prototype of
    prototype layer ``head_index``."""
    head = model.heads[0]
    z = F.normalize(head.projection_head(_trunk_output(model.trunk, x)).float(), dim=1)
    w = F.normalize(head.prototype_layers()[head_index].weight.float(), dim=1)
    return z @ w.t()


@torch.no_grad()
def assignment_scores(model, dataset, head_index: int = 0, batch_size: int = 256, num_workers: int = 0,
                      device=None) -> torch.Tensor:
    """``(N, K)`` float32 assignment scores of every item of ``dataset``
    (:func:`embed_and_score`, model in eval mode). Held in memory: ``N x K``
    floats (use ``limit`` in :func:`make_gallery` for large folders)."""
    device = device or next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    return torch.cat([embed_and_score(model, x.to(device), head_index).cpu() for x, _ in loader])


def top_images(scores: torch.Tensor, top: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(K, min(top, N))`` indices and scores of each prototype's highest-scoring
    images, best first."""
    m = min(int(top), scores.shape[0])
    values, order = scores.t().topk(m, dim=1, largest=True, sorted=True)
    return order, values


def prototype_stats(assigned: Sequence[int], labels: Optional[Sequence[int]], num_prototypes: int) -> List[Dict[str, Any]]:
    """Per prototype ``k``: ``assigned`` (images whose argmax is ``k``) and,
    with ``labels``, ``purity`` (fraction of those in their most frequent
    label, None if none assigned) and ``majority`` (that label, ties: the
    smallest)."""
    a = np.asarray(assigned, dtype=np.int64)
    counts = np.bincount(a, minlength=num_prototypes)
    out = [{"prototype": k, "assigned": int(counts[k])} for k in range(num_prototypes)]
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64)
        n_cls = int(y.max()) + 1 if len(y) else 1
        table = np.zeros((num_prototypes, n_cls), dtype=np.int64)
        np.add.at(table, (a, y), 1)
        for k in range(num_prototypes):
            if counts[k]:
                out[k]["majority"] = int(table[k].argmax())
                out[k]["purity"] = float(table[k].max() / counts[k])
            else:
                out[k]["majority"] = None
                out[k]["purity"] = None
    return out


# ------------------------------------------------------------------ drawing
def grid_size(rows: int, cols: int, tile: int, pad: int, label_width: int) -> Tuple[int, int]:
    """(width, height) of :func:`render_grid`'s image."""
    return label_width + cols * tile + (cols + 1) * pad, rows * tile + (rows + 1) * pad


def _tile(img, tile: int):
    from PIL import ImageOps

    return ImageOps.fit(img.convert("RGB"), (tile, tile))


def render_grid(rows: Sequence[Sequence[Any]], labels: Sequence[str], tile: int = 64, pad: int = 2,
                label_width: int = 0, cols: Optional[int] = None):
    """A PIL image: row ``r`` shows the PIL images ``rows[r]`` as squares of
    ``tile`` pixels, after ``label_width`` pixels holding ``labels[r]``."""
    from PIL import Image, ImageDraw, ImageFont

    cols = max((len(r) for r in rows), default=0) if cols is None else cols
    width, height = grid_size(len(rows), cols, tile, pad, label_width)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (images, text) in enumerate(zip(rows, labels)):
        y = pad + r * (tile + pad)
        if label_width:
            draw.multiline_text((4, y + 2), text, fill=(0, 0, 0), font=font, spacing=1)
        for c, img in enumerate(images[:cols]):
            canvas.paste(_tile(img, tile), (label_width + pad + c * (tile + pad), y))
    return canvas


def _label(stat: Mapping[str, Any], classes: Sequence[str]) -> str:
    lines = [f"prototype {stat['prototype']}", f"{stat['assigned']} assigned"]
    if stat.get("purity") is not None:
        lines.append(f"purity {100 * stat['purity']:.0f}% (class {classes[stat['majority']]})")
    return "\n".join(lines)


_SORT_SCRIPT = """<script>
document.querySelectorAll('#prototypes th').forEach(function (th, col) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', function () {
    var table = document.getElementById('prototypes');
    var rows = Array.from(table.rows).slice(1);
    var key = function (r) { var t = r.cells[col].innerText.replace('%', '').replace('prototype ', '');
                             var v = parseFloat(t); return isNaN(v) ? -Infinity : v; };
    var down = th.dataset.down !== '1'; th.dataset.down = down ? '1' : '0';
    rows.sort(function (a, b) { return down ? key(b) - key(a) : key(a) - key(b); });
    rows.forEach(function (r) { table.appendChild(r); });
  });
});
</script>
"""


def _write_html(path: Path, stats, classes, summary, strips) -> None:
    e = html.escape
    has_labels = bool(classes)
    head_cells = "<th>prototype</th><th>assigned</th>" + ("<th>purity</th><th>majority class</th>" if has_labels else "")
    rows = []
    for s in stats:
        k = s["prototype"]
        cells = f'<td><a href="#prototype-{k}">prototype {k}</a></td><td>{s["assigned"]}</td>'
        if has_labels:
            p = "&ndash;" if s["purity"] is None else f'{100 * s["purity"]:.1f}%'
            m = "&ndash;" if s["majority"] is None else e(classes[s["majority"]])
            cells += f"<td>{p}</td><td>{m}</td>"
        rows.append(f"<tr>{cells}</tr>")
    sections = []
    for s in stats:
        k = s["prototype"]
        desc = f'{s["assigned"]} images assigned'
        if has_labels and s["purity"] is not None:
            desc += f', purity {100 * s["purity"]:.1f}% (majority class {e(classes[s["majority"]])})'
        tops = ", ".join(f"{sc:.3f}" for sc in s["top_scores"])
        sections.append(
            f'<section id="prototype-{k}"><h3>prototype {k}</h3><p>{desc}; top scores: {tops}</p>'
            f'<img src="{e(strips[k])}" alt="top images of prototype {k}" loading="lazy"></section>'
        )
    facts = "".join(f"<li>{e(str(key))}: {e(str(val))}</li>" for key, val in summary.items())
    path.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Prototype gallery</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}section{margin:1em 0}"
        "img{image-rendering:pixelated}</style></head><body>\n"
        f"<h1>Prototype gallery</h1><ul>{facts}</ul>\n"
        f"<h2>All {len(stats)} prototypes</h2><p>Click a column title to sort.</p>"
        f"<table id=\"prototypes\"><tr>{head_cells}</tr>\n" + "\n".join(rows) + "</table>\n"
        "<h2>Top images per prototype</h2>\n" + "\n".join(sections) + "\n" + _SORT_SCRIPT + "</body></html>\n"
    )


# --------------------------------------------------------------------- main
def make_gallery(
    checkpoint,
    images,
    output_dir,
    config: Union[None, str, Path, Mapping] = None,
    num_prototypes: int = 16,
    top: int = 8,
    prototypes: Optional[Sequence[int]] = None,
    head_index: int = 0,
    tile: int = 64,
    pad: int = 2,
    label_width: int = 120,
    resize: Union[int, None, str] = "auto",
    crop: Union[int, None, str] = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    limit: Optional[int] = None,
) -> Dict[str, Any]:
    """Write the gallery (see the module docstring) and return a summary:
    the output paths, ``num_images``, ``num_prototypes``, ``shown`` (the
    prototypes of the PNG), ``overall_purity`` (None without labels) and
    ``png_size``. ``resize``/``crop`` ``"auto"``: from the config
    (:func:`full_view_settings`); ``limit``: the first images only."""
    from swav_vissl_plugin.knn import evenly_spaced

    model, config, ckpt = load_model(checkpoint, config)
    view = full_view_settings(config)
    if resize != "auto":
        view["resize"] = resize
    if crop != "auto":
        view["crop"] = crop
    paths, labels, classes = list_image_folder(images)
    keep = evenly_spaced(len(paths), limit)
    paths = [paths[i] for i in keep]
    labels = None if labels is None else [labels[i] for i in keep]
    dataset = ImageListDataset(paths, view["resize"], view["crop"], view["mean"], view["std"])
    scores = assignment_scores(model, dataset, head_index, batch_size, num_workers)
    k_total = scores.shape[1]
    assigned = scores.argmax(dim=1)
    order, top_scores = top_images(scores, top)
    stats = prototype_stats(assigned.tolist(), labels, k_total)
    for k, s in enumerate(stats):
        s["top_images"] = [str(paths[i]) for i in order[k].tolist()]
        s["top_scores"] = [round(float(v), 6) for v in top_scores[k]]

    if prototypes is None:
        chosen = sorted(range(k_total), key=lambda k: (-stats[k]["assigned"], k))[: int(num_prototypes)]
    else:
        chosen = [int(k) for k in prototypes]
        bad = [k for k in chosen if not 0 <= k < k_total]
        if bad:
            raise ValueError(f"prototypes {bad} outside 0..{k_total - 1}")

    out = Path(output_dir)
    (out / FILES_DIR).mkdir(parents=True, exist_ok=True)
    cache: Dict[int, Any] = {}

    def image(i: int):  # the full view as a tile (kept small: K x top of them)
        if i not in cache:
            cache[i] = _tile(dataset.load(i), tile)
        return cache[i]

    cols = order.shape[1]
    grid = render_grid(
        [[image(i) for i in order[k].tolist()] for k in chosen],
        [_label(stats[k], classes) for k in chosen],
        tile, pad, label_width, cols,
    )
    grid.save(out / PNG_NAME)
    strips = {}
    for k in range(k_total):
        name = f"{FILES_DIR}/prototype_{k}.png"
        render_grid([[image(i) for i in order[k].tolist()]], [""], tile, pad, 0, cols).save(out / name)
        strips[k] = name

    purity = None
    if labels is not None:
        purity = sum(s["purity"] * s["assigned"] for s in stats if s["purity"] is not None) / len(paths)
    summary = {
        "checkpoint": str(ckpt),
        "images": str(images),
        "num_images": len(paths),
        "head": head_index,
        "num_prototypes": k_total,
        "prototypes_used": int(sum(1 for s in stats if s["assigned"])),
        "overall_purity": purity,
        "full_view": f"resize {view['resize']}, crop {view['crop']}",
        "score": "cosine of the L2-normalised embedding and prototype",
    }
    (out / JSON_NAME).write_text(json.dumps({**summary, "classes": classes, "shown": chosen, "prototypes": stats}, indent=1))
    _write_html(out / HTML_NAME, stats, classes, summary, strips)
    logging.info("prototype gallery: %s", out)
    return {
        **summary,
        "png": str(out / PNG_NAME),
        "html": str(out / HTML_NAME),
        "json": str(out / JSON_NAME),
        "shown": chosen,
        "png_size": grid.size,
    }
