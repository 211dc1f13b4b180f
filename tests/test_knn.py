"""The weighted kNN monitor against a reference written from the definition.

Reference (InstDisc / DINO weighted kNN): for each test feature, the cosine
similarity to every train feature, the k largest, each neighbour votes for
its class with exp(similarity / T), prediction = the class of largest vote.
"""

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from swav_vissl_plugin.knn import KnnMonitorHook, knn_accuracy, weighted_knn_votes
from tolerances import EPS64, rtol, terms


def votes_rtol(dim, k, temperature):
    """Relative error of the float32 votes: a cosine (two dim-term norms and
    divisions, a dim-term dot product, the features' rounding) is off by
    (3 terms(dim) + 5) eps, which exp(cos / T) makes relative / T; then the
    exp and the sum over the k neighbours."""
    return rtol((3 * terms(dim) + 5) / temperature, 1, terms(k))


# accuracies: 100 c / n against 100 (c / n), float64 (2 roundings either side)
ACC_RTOL = 2 * rtol(2, eps=EPS64)


def reference_knn(train_x, train_y, test_x, k, T, num_classes):
    """Votes (n_test, C) and predictions, one test sample at a time in float64 NumPy."""
    tr = np.asarray(train_x, dtype=np.float64)
    te = np.asarray(test_x, dtype=np.float64)
    votes = np.zeros((len(te), num_classes))
    tr_norm = np.linalg.norm(tr, axis=1)
    for i, x in enumerate(te):
        sims = (tr @ x) / (tr_norm * np.linalg.norm(x))  # cosine to every train feature
        nearest = np.argsort(-sims, kind="stable")[: min(k, len(tr))]
        for j in nearest:
            votes[i, int(train_y[j])] += math.exp(sims[j] / T)
    return votes, votes.argmax(axis=1)


def fixed_features(seed=0, n_train=300, n_test=120, dim=16, classes=7):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = centres[ytr] + 2.5 * torch.randn(n_train, dim, generator=g)
    xte = centres[yte] + 2.5 * torch.randn(n_test, dim, generator=g)
    return xtr, ytr, xte, yte


def test_two_classes_by_hand_temperature_decides():
    # one class-0 neighbour at 0 deg, two class-1 neighbours at 10 deg; test point at 1 deg
    ang = lambda d: [math.cos(math.radians(d)), math.sin(math.radians(d))]  # noqa: E731
    xtr = torch.tensor([ang(0), ang(10), ang(10.5)])
    ytr = torch.tensor([0, 1, 1])
    xte = torch.tensor([ang(1)])
    # k = 1: the nearest is class 0
    assert weighted_knn_votes(xtr, ytr, xte, k=1, temperature=0.07).argmax(1).item() == 0
    # k = 3, T = 0.07: exp(cos 1 / T) < exp(cos 9 / T) + exp(cos 9.5 / T): class 1
    votes = weighted_knn_votes(xtr, ytr, xte, k=3, temperature=0.07)
    c = [math.cos(math.radians(a)) for a in (1, 9, 9.5)]
    expected = [math.exp(c[0] / 0.07), math.exp(c[1] / 0.07) + math.exp(c[2] / 0.07)]
    assert votes[0].tolist() == pytest.approx(expected, rel=votes_rtol(2, 3, 0.07))
    assert votes.argmax(1).item() == 1
    # a sharper temperature lets the single closest neighbour win
    assert weighted_knn_votes(xtr, ytr, xte, k=3, temperature=0.002).argmax(1).item() == 0


@pytest.mark.parametrize("k,T,chunk", [(20, 0.07, 1024), (5, 0.5, 7), (500, 0.07, 50)])
def test_votes_and_accuracy_equal_reference(k, T, chunk):
    xtr, ytr, xte, yte = fixed_features()
    ref_votes, ref_pred = reference_knn(xtr, ytr, xte, k, T, 7)
    votes = weighted_knn_votes(xtr, ytr, xte, k=k, temperature=T, num_classes=7, chunk_size=chunk)
    # each vote relative to itself (classes without a vote are 0 on both sides)
    np.testing.assert_allclose(votes.double().numpy(), ref_votes, rtol=votes_rtol(16, k, T), atol=0)
    acc = knn_accuracy(xtr, ytr, xte, yte, k=k, temperature=T, num_classes=7)
    ref_top1 = 100.0 * float((ref_pred == yte.numpy()).mean())
    assert acc["top1"] == pytest.approx(ref_top1, rel=ACC_RTOL)
    # top-5: the class got a vote and at most 4 classes got more (unvoted classes are not ranked)
    ref_top5 = 100.0 * float(np.mean([v[y] > 0 and (v > v[y]).sum() < 5 for v, y in zip(ref_votes, yte.numpy())]))
    assert acc["top5"] == pytest.approx(ref_top5, rel=ACC_RTOL)
    assert 30 < acc["top1"] < 100  # informative features, not a degenerate case


def test_hook_schedule():
    hook = KnnMonitorHook({"EVERY_N_EPOCHS": 3})
    assert [e for e in range(10) if hook.due(e, 10)] == [2, 5, 8, 9]  # every 3rd epoch and the last


_SPLITS = {}


def splits(mnist_folder):
    """The quickstart's own loading of both splits (whole images, normalised), cached."""
    from swav_vissl_plugin.quickstart import load_split

    if not _SPLITS:
        _SPLITS["v"] = (load_split(mnist_folder["train"]), load_split(mnist_folder["val"]))
    return _SPLITS["v"]


def test_hook_checks_folders_at_start(mnist_folder, tmp_path):
    from swav_vissl_plugin.knn import knn_settings

    cfg = {"SWAV_PLUGIN": {"MONITOR": {"KNN": {
        "ENABLED": True, "TRAIN_PATH": str(mnist_folder["train"]), "VAL_PATH": str(tmp_path / "missing")}}}}
    with pytest.raises(FileNotFoundError, match="missing"):
        KnnMonitorHook(knn_settings(cfg), cfg).on_start(SimpleNamespace())
    with pytest.raises(ValueError, match=r"MONITOR.KNN.VAL_PATH is required"):
        knn_settings({"SWAV_PLUGIN": {"MONITOR": {"KNN": {"ENABLED": True, "TRAIN_PATH": "x"}}}})


@pytest.mark.parametrize("resize, crop, warned", [(256, 224, True), (56, None, False), (None, None, False)])
def test_hook_warns_when_its_view_upsamples_the_images(mnist_folder, caplog, resize, crop, warned):
    # 28 px digits: resize 256 is 9.1x (the ImageNet view: warned), 56 is 2x (not above the limit)
    from swav_vissl_plugin.knn import knn_settings

    cfg = {"SWAV_PLUGIN": {"MONITOR": {"KNN": {
        "ENABLED": True, "TRAIN_PATH": str(mnist_folder["train"]), "VAL_PATH": str(mnist_folder["val"]),
        "RESIZE": resize, "CROP": crop}}}}
    with caplog.at_level(logging.WARNING):
        KnnMonitorHook(knn_settings(cfg), cfg).on_start(SimpleNamespace())
    found = [r.getMessage() for r in caplog.records if "upsamples" in r.getMessage()]
    if warned:
        (msg,) = found
        assert "config.SWAV_PLUGIN.MONITOR.KNN.RESIZE=256 upsamples the training images (shorter side 28 px) 9.1x" in msg
        assert "about 84x the compute" in msg and "RESIZE: null and CROP: null" in msg
    else:
        assert not found


class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.setdefault(tag, []).append((global_step, float(value)))

    def flush(self):
        pass


def test_hook_on_quickstart_folders_equals_reference(mnist_folder, tmp_path):
    """The hook's accuracy for a fixed (random-init) trunk equals the
    reference on features extracted by the quickstart's own pipeline."""
    from swav_vissl_plugin.knn import knn_settings
    from swav_vissl_plugin.quickstart import extract_features

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )
    wrapped = _ListTrunk(trunk)  # VISSL trunks return a list of outputs
    cfg = {"SWAV_PLUGIN": {"MONITOR": {"KNN": {
        "ENABLED": True, "TRAIN_PATH": str(mnist_folder["train"]), "VAL_PATH": str(mnist_folder["val"]),
        "RESIZE": None, "CROP": None, "NUM_WORKERS": 0, "TRAIN_LIMIT": 800, "VAL_LIMIT": 250}}},
        "HOOKS": {"TENSORBOARD_SETUP": {"USE_TENSORBOARD": False}}}
    hook = KnnMonitorHook(knn_settings(cfg), cfg)
    writer = FakeWriter()
    task = SimpleNamespace(
        train=True, train_phase_idx=4, num_train_phases=5, iteration=50, phase_idx=4,
        base_model=SimpleNamespace(trunk=wrapped), checkpoint_folder=str(tmp_path),
        hooks=[SimpleNamespace(tb_writer=writer)], config=cfg, device=torch.device("cpu"),
    )
    hook.on_phase_end(task)
    assert wrapped.training  # mode restored

    # reference: the quickstart's loader, the same evenly spaced subsets, the reference kNN
    (xtr, ytr), (xva, yva) = splits(mnist_folder)
    itr = np.linspace(0, len(ytr) - 1, 800).round().astype(int)
    iva = np.linspace(0, len(yva) - 1, 250).round().astype(int)
    ftr = extract_features(wrapped, xtr[itr])
    fva = extract_features(wrapped, xva[iva])
    _, pred = reference_knn(ftr, ytr[itr].numpy(), fva, 20, 0.07, 10)
    ref_top1 = 100.0 * float((pred == yva[iva].numpy()).mean())

    rec = json.loads((tmp_path / "metrics.json").read_text().splitlines()[-1])
    assert rec["train_phase_idx"] == 4 and rec["iteration"] == 50
    assert (rec["knn_k"], rec["knn_temperature"], rec["knn_train_images"], rec["knn_val_images"]) == (20, 0.07, 800, 250)
    assert abs(rec["knn_top1"] - ref_top1) <= 100 / 250 + 1e-9  # at most one image flips on float rounding
    assert writer.scalars["kNN/top1"] == [(4, pytest.approx(rec["knn_top1"]))]
    assert rec["knn_top1"] > 20  # well above chance (10%) even for a random trunk


class _ListTrunk(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return [self.net(x)]


@pytest.fixture(scope="module")
def run(mnist_folder, tmp_path_factory):
    import monitor_run

    return monitor_run.trained_run(mnist_folder, tmp_path_factory)


def test_real_run_knn_in_metrics_json_and_tensorboard(run, mnist_folder):
    """After each epoch of the real run, metrics.json has the kNN top-1; the
    last one equals the reference kNN on the final checkpoint's trunk."""
    import monitor_run as m
    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.quickstart import build_trunk, extract_features

    lines = [json.loads(l) for l in (run["ckpt"] / "metrics.json").read_text().splitlines()]
    knn = [r for r in lines if "knn_top1" in r]
    assert [r["train_phase_idx"] for r in knn] == list(range(m.EPOCHS))
    assert [r["iteration"] for r in knn] == [m.ITERS_PER_EPOCH * (e + 1) for e in range(m.EPOCHS)]
    tb = m.scalars(run["ckpt"])
    assert [(s, round(v, 3)) for s, v in tb["kNN/top1"]] == [(r["train_phase_idx"], round(r["knn_top1"], 3)) for r in knn]

    _, config = compose(run["overrides"][:1] + [o for o in run["overrides"][1:] if not o.startswith("++")], dump_config=False)
    trunk = build_trunk(config, str(sorted(run["ckpt"].glob("model_final_checkpoint_phase*.torch"))[-1]))
    (xtr, ytr), (xva, yva) = splits(mnist_folder)
    itr = np.linspace(0, len(ytr) - 1, m.KNN_TRAIN).round().astype(int)
    iva = np.linspace(0, len(yva) - 1, m.KNN_VAL).round().astype(int)
    _, pred = reference_knn(extract_features(trunk, xtr[itr]), ytr[itr].numpy(), extract_features(trunk, xva[iva]), 20, 0.07, 10)
    ref_top1 = 100.0 * float((pred == yva[iva].numpy()).mean())
    assert abs(knn[-1]["knn_top1"] - ref_top1) <= 100 / m.KNN_VAL + 1e-9
