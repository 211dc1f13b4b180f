"""``swav_plugin_train_step``: VISSL's iteration with torch.autocast in float16 or bfloat16.

The runs go through VISSL's real trainer on CPU (``tests/cpu_runs.py``).
VISSL only enables mixed precision on GPU, so the runs with autocast set on
the task what VISSL sets on GPU for ``USE_AMP: true, AMP_TYPE: pytorch``
(``amp_type``, ``DTYPE``, a ``GradScaler`` for float16); the step itself is
unchanged.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from classy_vision.tasks.classification_task import AmpType

from cpu_runs import default_runs
from swav_vissl_plugin.train_step import TRAIN_STEP_NAME, autocast_dtype
from tolerances import unit_norm_tol


@pytest.fixture(scope="module")
def runs(mnist_folder):
    return default_runs(str(mnist_folder["train"]), str(mnist_folder["val"]))


def _ok(runs, name):
    rec = runs[name]
    assert rec["ok"], rec["error"]
    return rec


def test_swav_base_trains_with_the_plugin_step(compose_cfg):
    c = compose_cfg(config="swav_plugin/pretrain/swav_800ep")
    assert c.TRAINER.TRAIN_STEP_NAME == TRAIN_STEP_NAME
    assert (c.MODEL.AMP_PARAMS.USE_AMP, c.MODEL.AMP_PARAMS.AMP_TYPE, c.MODEL.AMP_PARAMS.DTYPE) == (True, "pytorch", "float16")
    # bf16 is one override away
    c = compose_cfg("config.MODEL.AMP_PARAMS.DTYPE=bfloat16", config="swav_plugin/pretrain/swav_800ep")
    assert c.MODEL.AMP_PARAMS.DTYPE == "bfloat16"


def test_autocast_dtype_follows_the_task():
    cfg = lambda d: SimpleNamespace(MODEL=SimpleNamespace(AMP_PARAMS={"DTYPE": d}))  # noqa: E731
    assert autocast_dtype(SimpleNamespace(amp_type=None, config=cfg("bfloat16"))) is None
    assert autocast_dtype(SimpleNamespace(amp_type=AmpType.PYTORCH, config=cfg("bfloat16"))) is torch.bfloat16
    assert autocast_dtype(SimpleNamespace(amp_type=AmpType.PYTORCH, config=cfg("float16"))) is torch.float16
    with pytest.raises(RuntimeError, match="AMP_TYPE=pytorch"):
        autocast_dtype(SimpleNamespace(amp_type=AmpType.APEX, config=cfg("float16")))


@pytest.mark.parametrize("name, dtype", [("pretrain_fp32", "float32"), ("pretrain_bf16", "bfloat16"), ("pretrain_fp16", "float16")])
def test_forward_runs_in_the_chosen_precision(runs, name, dtype):
    rec = _ok(runs, name)
    steps = rec["steps"]
    assert steps and all(s["train"] for s in steps)
    for s in steps:
        # head output: embeddings and prototype scores, computed under autocast
        assert set(s["output_dtypes"]) == {dtype}, s
        # the prototypes are float32 parameters in every precision (autocast
        # casts the forward's ops only), normalised by the hook in float32
        assert math.isfinite(s["loss"]) and s["prototypes_norm_error"] <= unit_norm_tol(64)  # quickstart feat_dim


def test_float16_scales_the_loss_and_bfloat16_does_not(runs):
    fp16, bf16, fp32 = (_ok(runs, n)["steps"] for n in ("pretrain_fp16", "pretrain_bf16", "pretrain_fp32"))
    assert all(s["grad_scale"] is not None and s["grad_scale"] > 1 for s in fp16)
    assert all(s["grad_scale"] is None for s in bf16 + fp32)


def test_updates_happen_in_every_precision(runs):
    # prototypes frozen for 1 iteration, then moved by the optimizer step
    for name in ("pretrain_fp32", "pretrain_bf16", "pretrain_fp16"):
        moved = [s["prototypes_moved"] for s in _ok(runs, name)["steps"]]
        assert len(moved) == 2 and moved[0] == 0.0 and moved[1] > 0.0, (name, moved)


def test_start_of_training_is_logged_with_iterations_per_epoch(runs):
    log = _ok(runs, "pretrain_fp32")["start_log"]
    assert len(log) == 1, log
    assert "2 iterations per epoch" in log[0] and "freeze_prototypes_niters 1 = 0.50 epochs" in log[0], log
