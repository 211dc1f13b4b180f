"""The prototype gallery: stats and layout by hand, then the command-line tool
on the quickstart's data with a checkpoint of a real run (tests/monitor_run.py)."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from swav_vissl_plugin.gallery import grid_size, prototype_stats, render_grid, top_images
from tolerances import rtol, terms, unit_norm_tol

ROOT = Path(__file__).resolve().parents[1]


def test_prototype_stats_by_hand():
    assigned = [0, 0, 0, 0, 1, 1, 3]
    labels = [2, 2, 2, 5, 1, 4, 0]
    st = prototype_stats(assigned, labels, 4)
    assert [s["assigned"] for s in st] == [4, 2, 0, 1]
    assert st[0]["purity"] == 0.75 and st[0]["majority"] == 2
    assert st[1]["purity"] == 0.5 and st[1]["majority"] == 1  # tie 1 vs 4: the smaller label
    assert st[2]["purity"] is None and st[2]["majority"] is None
    assert st[3]["purity"] == 1.0 and st[3]["majority"] == 0
    assert "purity" not in prototype_stats(assigned, None, 4)[0]


def test_top_images_by_hand():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.95], [0.7, -1.0]])
    idx, val = top_images(scores, 3)
    assert idx.tolist() == [[1, 3, 2], [2, 0, 1]]
    assert val[0].tolist() == pytest.approx([0.8, 0.7, 0.5])
    assert top_images(scores, 10)[0].shape == (2, 4)  # at most all images


def test_render_grid_layout():
    from PIL import Image

    colours = [[(10 * r + c, 100 + r, 200 - c) for c in range(4)] for r in range(3)]
    rows = [[Image.new("RGB", (7, 5), col) for col in row] for row in colours]
    img = render_grid(rows, ["a", "b", "c"], tile=10, pad=2, label_width=30)
    assert img.size == grid_size(3, 4, 10, 2, 30) == (30 + 4 * 10 + 5 * 2, 3 * 10 + 4 * 2)
    for r in range(3):
        for c in range(4):
            x, y = 30 + 2 + c * 12 + 5, 2 + r * 12 + 5  # tile centres
            assert img.getpixel((x, y)) == colours[r][c]
    assert img.getpixel((30 + 1, 1)) == (255, 255, 255)  # padding


@pytest.fixture(scope="module")
def run(mnist_folder, tmp_path_factory):
    import monitor_run

    return monitor_run.trained_run(mnist_folder, tmp_path_factory)


def _cli():
    spec = importlib.util.spec_from_file_location("prototype_gallery_cli", ROOT / "tools" / "prototype_gallery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_on_quickstart_data(run, mnist_folder, tmp_path, capsys):
    out = tmp_path / "gallery"
    rc = _cli().main([
        "--checkpoint", str(run["ckpt"]), "--images", str(mnist_folder["val"]), "--output", str(out),
        "--num-prototypes", "5", "--top", "6", "--tile", "20",
    ])
    assert rc == 0
    assert "overall purity" in capsys.readouterr().out

    from PIL import Image

    png = Image.open(out / "prototype_gallery.png")
    assert png.size == grid_size(5, 6, 20, 2, 120) == (120 + 6 * 20 + 7 * 2, 5 * 20 + 6 * 2)

    summary = json.loads((out / "prototype_gallery.json").read_text())
    stats = summary["prototypes"]
    assert summary["num_prototypes"] == len(stats) == 100 and summary["num_images"] == 1000
    page = (out / "prototype_gallery.html").read_text()
    for k in range(100):  # every prototype is named, with a section and its strip
        assert f'id="prototype-{k}"' in page and f"<h3>prototype {k}</h3>" in page
        assert (out / "prototype_gallery_files" / f"prototype_{k}.png").is_file()
    assert len(re.findall(r'<section id="prototype-\d+"', page)) == 100

    # independent check of the scores: the checkpoint's model as the quickstart loads it,
    # the head's own forward (prototypes are unit-norm), whole images as the quickstart reads them
    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.quickstart import load_split
    from vissl.models import build_model

    _, config = compose([o for o in run["overrides"] if not o.startswith("++")], dump_config=False)
    model = build_model(config.MODEL, config.OPTIMIZER)
    ckpt = sorted(run["ckpt"].glob("model_final_checkpoint_phase*.torch"))[-1]
    model.set_classy_state(torch.load(ckpt, map_location="cpu", weights_only=True)["classy_state_dict"]["base_model"])
    model.eval()
    x, y = load_split(mnist_folder["val"])
    with torch.no_grad():
        feats = model.trunk(x)[0].flatten(1)
        z, scores = model.heads[0](feats)
    w = model.heads[0].prototype_parameters()[0]
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100), rtol=0, atol=unit_norm_tol(w.shape[1]))
    assigned = scores.argmax(1)
    assert [s["assigned"] for s in stats] == torch.bincount(assigned, minlength=100).tolist()
    # purity from the labels: majority fraction among assigned images
    for k in range(100):
        members = y[assigned == k]
        if len(members) == 0:
            assert stats[k]["purity"] is None
        else:
            assert stats[k]["purity"] == pytest.approx(float(torch.bincount(members).max()) / len(members))
    expected_purity = sum(int(torch.bincount(y[assigned == k]).max()) for k in range(100) if (assigned == k).any()) / 1000
    assert summary["overall_purity"] == pytest.approx(expected_purity)
    # the PNG's rows are the most-assigned prototypes, each with its 6 best-scoring images
    counts = torch.bincount(assigned, minlength=100).tolist()
    assert summary["shown"] == sorted(range(100), key=lambda k: (-counts[k], k))[:5]
    names = [str(p) for p in sorted(Path(mnist_folder["val"]).glob("*/*.png"), key=lambda p: (p.parent.name, p.name))]
    for k in summary["shown"]:
        best = np.argsort(-scores[:, k].numpy(), kind="stable")[:6]
        assert stats[k]["top_images"] == [names[i] for i in best]
        # cosines (<= 1): the JSON's 6 decimals, and either side's float32
        # rounding (the tool normalises the prototypes again; a D-term dot)
        tol = 5e-7 + 2 * (unit_norm_tol(w.shape[1]) + rtol(terms(w.shape[1])))
        assert stats[k]["top_scores"] == pytest.approx(scores[best, k].tolist(), abs=tol)
