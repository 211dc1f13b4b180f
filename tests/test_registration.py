"""Importing the plugin registers its components and changes no built-in."""

import json
import subprocess
import sys

SNAPSHOT = r"""
import json, sys
from classy_vision.dataset.transforms import TRANSFORM_REGISTRY
from classy_vision.losses import LOSS_REGISTRY
from classy_vision.optim import OPTIMIZER_REGISTRY
from classy_vision.optim.param_scheduler import PARAM_SCHEDULER_REGISTRY
import vissl.data.ssl_transforms  # noqa: registers VISSL's transforms
import vissl.losses, vissl.optimizers  # noqa
from vissl.data.collators import COLLATOR_REGISTRY
from vissl.models.heads import MODEL_HEADS_REGISTRY
from vissl.models.trunks import MODEL_TRUNKS_REGISTRY
from vissl.trainer.train_steps import TRAIN_STEP_REGISTRY
from vissl.data.ssl_transforms import ssl_transforms_wrapper as w
from vissl.data import DATASET_SOURCE_MAP
if sys.argv[1] == "plugin":
    import swav_vissl_plugin  # noqa
regs = dict(loss=LOSS_REGISTRY, model_head=MODEL_HEADS_REGISTRY, model_trunk=MODEL_TRUNKS_REGISTRY,
            transform=TRANSFORM_REGISTRY, collator=COLLATOR_REGISTRY, optimizer=OPTIMIZER_REGISTRY,
            param_scheduler=PARAM_SCHEDULER_REGISTRY, train_step=TRAIN_STEP_REGISTRY,
            data_source=DATASET_SOURCE_MAP)
out = {k: {n: f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', repr(v))}" for n, v in r.items()}
       for k, r in regs.items()}
out["copies"] = list(w._TRANSFORMS_WITH_COPIES)
print(json.dumps(out))
"""


def _snapshot(mode):
    res = subprocess.run([sys.executable, "-c", SNAPSHOT, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_registers_its_names_and_leaves_builtins_alone():
    import swav_vissl_plugin

    before, after = _snapshot("vissl"), _snapshot("plugin")
    for registry, names in swav_vissl_plugin.REGISTERED.items():
        for name in names:
            assert name not in before[registry], f"{name} collides with a built-in {registry}"
            assert after[registry][name].startswith("swav_vissl_plugin."), (registry, name)
        # every built-in entry still maps to the very same object
        for name, target in before[registry].items():
            assert after[registry][name] == target, (registry, name)
        assert set(after[registry]) - set(before[registry]) == set(names), registry
    # multi-crop is declared a "transform with copies", nothing else changes
    assert after["copies"] == before["copies"] + ["SwavPluginMultiCrop"]


def test_builtin_swav_names_untouched():
    import swav_vissl_plugin

    taken = {"swav_loss", "swav_head", "ImgPilToMultiCrop", "lars", "cosine", "multicrop_collator"}
    assert not taken & {n for names in swav_vissl_plugin.REGISTERED.values() for n in names}
