"""Linear evaluation through VISSL's benchmark machinery (recipe: "Linear evaluation").

Frozen trunk, res5 global average pool, one Linear layer N(0, 0.01) / 0,
SGD momentum 0.9 at 0.3 per 256 with cosine to 0 over 100 epochs, wd 1e-6,
RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224); weights from a
VISSL checkpoint or a plain state-dict file; and the CPU variant end to end.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from cpu_runs import default_runs

LE = "swav_plugin/linear_eval"
MEAN, STD = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]


def _compose(compose_cfg, name, *overrides):
    return compose_cfg("config.MODEL.WEIGHTS_INIT.PARAMS_FILE=/nonexistent.torch", *overrides, config=f"{LE}/{name}")


def test_in1k_config_is_the_recipe(compose_cfg):
    c = _compose(compose_cfg, "swav_in1k_linear")
    fe = c.MODEL.FEATURE_EVAL_SETTINGS
    assert fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_ONLY and fe.SHOULD_FLATTEN_FEATS
    assert fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP == [["res5avg", ["Identity", []]]]
    assert c.MODEL.HEAD.PARAMS == [["swav_plugin_linear", {"in_dim": 2048, "num_classes": 1000}]]
    assert (c.MODEL.TRUNK.NAME, c.MODEL.TRUNK.RESNETS.DEPTH, c.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER) == ("resnet", 50, 1)
    assert c.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME == "classy_state_dict"
    o = c.OPTIMIZER
    assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.num_epochs) == ("sgd", 0.9, False, 1e-6, 100)
    lr = o.param_schedulers.lr
    assert (lr.name, lr.start_value, lr.end_value, lr.update_interval) == ("cosine", 0.3, 0.0, "epoch")  # 8 x 32 = 256
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA * c.DISTRIBUTED.NUM_PROC_PER_NODE == 256
    train = [(t["name"], t.get("size")) for t in c.DATA.TRAIN.TRANSFORMS]
    test = [(t["name"], t.get("size")) for t in c.DATA.TEST.TRANSFORMS]
    assert train == [("RandomResizedCrop", 224), ("RandomHorizontalFlip", None), ("ToTensor", None), ("Normalize", None)]
    assert test == [("Resize", 256), ("CenterCrop", 224), ("ToTensor", None), ("Normalize", None)]
    for t in (c.DATA.TRAIN.TRANSFORMS[-1], c.DATA.TEST.TRANSFORMS[-1]):
        assert (t["mean"], t["std"]) == (MEAN, STD)
    assert c.TEST_MODEL and c.METERS.accuracy_list_meter.meter_names == ["res5avg"]
    # fewer GPUs: the LR follows 0.3 per 256
    c = _compose(compose_cfg, "swav_in1k_linear", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    assert c.OPTIMIZER.param_schedulers.lr.start_value == pytest.approx(0.3 * 64 / 256)


@pytest.mark.parametrize("width", [2, 4, 5])
def test_wide_configs_read_the_wide_trunk(compose_cfg, width):
    c = _compose(compose_cfg, f"swav_RN50w{width}_in1k_linear")
    assert c.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER == width
    assert c.MODEL.HEAD.PARAMS == [["swav_plugin_linear", {"in_dim": 2048 * width, "num_classes": 1000}]]
    from vissl.models import build_model

    with torch.device("meta"):
        model = build_model(c.MODEL, c.OPTIMIZER)
        out = model(torch.empty(2, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(2, 1000)]


def test_linear_head_init_is_the_recipe(compose_cfg):
    from vissl.models import build_model

    c = _compose(compose_cfg, "swav_in1k_linear")
    head = build_model(c.MODEL, c.OPTIMIZER).heads[0]
    w, b = head.linear.weight, head.linear.bias
    assert w.std().item() == pytest.approx(0.01, rel=0.02) and abs(w.mean().item()) < 2e-4
    assert torch.count_nonzero(b) == 0


def test_plain_state_dict_file_fills_the_trunk(compose_cfg, tmp_path):
    """The release publishes torchvision-layout ResNet state dicts with DDP's "module." prefix."""
    import torchvision
    from vissl.models import build_model

    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    state = {f"module.{k}": v for k, v in tv.state_dict().items()}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)  # ignored
    state["module.prototypes.weight"] = torch.zeros(3000, 128)  # ignored
    path = tmp_path / "swav_release.pth.tar"
    torch.save(state, path)

    c = compose_cfg(
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}",
        f"+config/{LE}/weights=state_dict_file",
        config=f"{LE}/swav_in1k_linear",
    )
    model = build_model(c.MODEL, c.OPTIMIZER)
    head_before = model.heads[0].linear.weight.clone()
    model.init_model_from_weights_params_file(c, torch.load(path, weights_only=True))
    ours = model.trunk.base_model._feature_blocks.state_dict()
    theirs = tv.state_dict()
    loaded = [k for k in theirs if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(loaded) == 53 * 5  # 53 convolutions and 53 BatchNorms (4 tensors each) in ResNet-50
    for k in loaded:
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(model.heads[0].linear.weight, head_before)


@pytest.fixture(scope="module")
def runs(mnist_folder):
    return default_runs(str(mnist_folder["train"]), str(mnist_folder["val"]))


def test_cpu_linear_eval_end_to_end(runs):
    rec = runs["linear_eval"]
    assert rec["ok"], rec["error"]
    assert rec["trunk_frozen"]
    steps = rec["steps"]
    train = [s for s in steps if s["train"]]
    test = [s for s in steps if not s["train"]]
    # 2 epochs x 128 / 32 train iterations; 2 x 64 / 32 test iterations: both splits went through VISSL
    assert len(train) == 8 and len(test) == 4
    assert all(s["input_shapes"] == [[32, 3, 28, 28]] and s["output_shapes"] == [[32, 10]] for s in steps)
    # 0.3 per 256 at batch 32, cosine over 2 epochs stepped per epoch
    assert [round(s["lr"], 6) for s in train] == [0.0375] * 4 + [0.01875] * 4
    ckpt_dir = Path(rec["checkpoint"]).parent
    metrics = [json.loads(l) for l in (ckpt_dir / "metrics.json").read_text().splitlines()]
    tops = {}
    for m in metrics:
        for key in ("train_accuracy_list_meter", "test_accuracy_list_meter"):
            if key in m:
                tops.setdefault(key, []).append(m[key]["top_1"]["flatten"])
    assert len(tops["train_accuracy_list_meter"]) == 2 and len(tops["test_accuracy_list_meter"]) == 2
    for v in tops["train_accuracy_list_meter"] + tops["test_accuracy_list_meter"]:
        assert math.isfinite(v) and 0.0 <= v <= 100.0


def test_cpu_linear_eval_keeps_the_pretrained_trunk(runs):
    rec = runs["linear_eval"]
    assert rec["ok"], rec["error"]
    pre = torch.load(runs["pretrain_fp32"]["checkpoint"], map_location="cpu", weights_only=True)
    ev = torch.load(rec["checkpoint"], map_location="cpu", weights_only=True)
    pre_trunk = pre["classy_state_dict"]["base_model"]["model"]["trunk"]
    ev_trunk = ev["classy_state_dict"]["base_model"]["model"]["trunk"]
    compared = 0
    for k, v in pre_trunk.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(ev_trunk[f"base_model.{k}"], v), k  # loaded, then frozen (BN statistics too)
        compared += 1
    assert compared == len([k for k in pre_trunk if not k.endswith("num_batches_tracked")]) > 20
