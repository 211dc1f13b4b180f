"""Published SwAV weights <-> VISSL checkpoints."""

import copy
import functools
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from swav_vissl_plugin.checkpoints import (
    CheckpointError,
    load_state,
    load_trunk_into_torchvision,
    published_to_vissl_checkpoint,
    torchvision_resnet50,
    vissl_to_published,
)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"


def _release_head(nmb_prototypes):
    """The SwAV release's head, written from its description: Linear-BN-ReLU-Linear
    (projection_head) and bias-free prototypes (one Linear, or prototypes{i})."""
    head = nn.Module()
    head.projection_head = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128))
    if len(nmb_prototypes) == 1:
        head.prototypes = nn.Linear(128, nmb_prototypes[0], bias=False)
    else:
        head.prototypes = nn.Module()
        for i, k in enumerate(nmb_prototypes):
            setattr(head.prototypes, f"prototypes{i}", nn.Linear(128, k, bias=False))
    return head


def _published(nmb_prototypes=(30,), module_prefix=True, seed=0):
    torch.manual_seed(seed)
    trunk = torchvision_resnet50()
    for m in trunk.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = OrderedDict((k, v) for k, v in trunk.state_dict().items() if not k.startswith("fc."))
    state.update(_release_head(list(nmb_prototypes)).state_dict())
    if module_prefix:
        state = OrderedDict(("module." + k, v) for k, v in state.items())
    return state, trunk


def _tv_features(model, x):
    """torchvision ResNet forward without the classifier: pooled res5 features."""
    return torch.flatten(nn.Sequential(*list(model.children())[:-1])(x), 1)


@functools.lru_cache(maxsize=None)
def _vissl_model(nmb_prototypes):
    import swav_vissl_plugin  # noqa: F401
    from swav_vissl_plugin.config import compose

    heads = list(nmb_prototypes)
    _, cfg = compose(
        [
            "config=swav_plugin/pretrain/swav_base",
            "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=false",
            f"config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{{in_dim:2048,hidden_mlp:2048,feat_dim:128,nmb_prototypes:{heads}}}]]",
        ],
        dump_config=False,
    )
    from vissl.models import build_model

    return build_model(cfg.MODEL, cfg.OPTIMIZER).eval()


def test_round_trip_is_identical():
    published, _ = _published(module_prefix=False)
    back = vissl_to_published(published_to_vissl_checkpoint(published))
    assert list(back) == list(published)
    assert all(torch.equal(back[k], published[k]) for k in published)


def test_module_prefix_is_removed():
    prefixed, _ = _published(module_prefix=True)
    back = vissl_to_published(published_to_vissl_checkpoint(prefixed))
    assert list(back) == [k[len("module."):] for k in prefixed]


@pytest.mark.parametrize("nmb_prototypes", [(30,), (30, 30, 30)])
def test_imported_weights_compute_the_same_features(nmb_prototypes):
    published, trunk = _published(nmb_prototypes)
    model = copy.deepcopy(_vissl_model(nmb_prototypes))
    model.set_classy_state(published_to_vissl_checkpoint(published)["classy_state_dict"]["base_model"])
    x = torch.randn(2, 3, 64, 64)
    trunk.eval()
    with torch.no_grad():
        ref = _tv_features(trunk, x)
        ours = model.trunk(x, ["flatten"])[0]
        # exact: VISSL's trunk and head are torchvision's / the release's
        # layers, the same kernels on the same weights and input (the
        # features reach ~200, where 1e-5 was already below an ulp)
        assert torch.equal(ours, ref)
        # head: the release's forward on the same features
        release_head = _release_head(list(nmb_prototypes)).eval()
        release_head.load_state_dict({k[len("module."):]: v for k, v in published.items()
                                      if k.startswith(("module.projection_head", "module.prototypes"))})
        z = nn.functional.normalize(release_head.projection_head(ref), dim=1)
        out = model.heads[0](ours)
        assert torch.equal(out[0], z)
        protos = [release_head.prototypes] if len(nmb_prototypes) == 1 else [
            getattr(release_head.prototypes, f"prototypes{i}") for i in range(len(nmb_prototypes))]
        for scores, p in zip(out[1:], protos):
            assert torch.equal(scores, p(z))


def test_exported_trunk_loads_strictly_into_torchvision_and_matches(tmp_path):
    model = copy.deepcopy(_vissl_model((30,)))
    with torch.no_grad():  # make it differ from any default initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = {"classy_state_dict": {"base_model": model.get_classy_state()}}
    exported = vissl_to_published(ckpt)
    assert "prototypes.weight" in exported and "projection_head.0.weight" in exported
    tv = load_trunk_into_torchvision(exported)
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tv_feat = _tv_features(tv, x)
        assert torch.equal(tv_feat, model.trunk(x, ["flatten"])[0])  # the same layers and weights: exact
    # plain torchvision API: resnet50().load_state_dict(trunk, strict=True)
    import torchvision

    trunk_only = {k: v for k, v in exported.items() if not k.startswith(("projection_head", "prototypes"))}
    tvm = torchvision.models.resnet50()
    missing = tvm.load_state_dict(trunk_only, strict=False)
    assert missing.unexpected_keys == [] and sorted(missing.missing_keys) == ["fc.bias", "fc.weight"]


def test_wide_variant_layout():
    tv = torchvision_resnet50(width=2)
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert state["conv1.weight"].shape[0] == 128 and state["layer4.2.conv3.weight"].shape[0] == 4096
    loaded = load_trunk_into_torchvision(state)
    assert loaded.fc.in_features == 4096


def test_arbitrary_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'state_dict': Evil()}}, {str(evil)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        load_state(evil)
    assert not marker.exists()


def _tool_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_tool_converts_both_ways_and_never_overwrites(tmp_path, capsys):
    published, _ = _published(nmb_prototypes=(30,), module_prefix=True)
    src, vissl_file, back = tmp_path / "pub.pth", tmp_path / "vissl.torch", tmp_path / "back.pth"
    torch.save(published, src)
    # the command line once, for real
    res = subprocess.run([sys.executable, str(TOOL), "to-vissl", str(src), str(vissl_file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    main = _tool_main()
    assert main(["to-published", str(vissl_file), str(back)]) == 0
    restored = torch.load(back, weights_only=True)
    assert list(restored) == [k[len("module."):] for k in published]
    assert all(torch.equal(restored[k[len("module."):]], v) for k, v in published.items())
    before = back.read_bytes()
    capsys.readouterr()
    assert main(["to-published", str(vissl_file), str(back)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert back.read_bytes() == before
    assert main(["to-vissl", str(tmp_path / "missing.pth"), str(tmp_path / "x.torch")]) == 2
    assert "missing.pth" in capsys.readouterr().err and not (tmp_path / "x.torch").exists()
