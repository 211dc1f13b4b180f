"""One tiny monitored training run, shared by test_monitoring, test_knn and
test_gallery (run once per pytest session, on first use).

It is launched as users launch it (``python -m swav_vissl_plugin.launcher``,
VISSL's engine, one process, the plugin's hook generator) on the quickstart
config and the quickstart's real MNIST image folder: 128 training images,
batch 32, 2 epochs (8 iterations), prototypes frozen for 2 iterations,
VISSL's TensorBoard hook on, the kNN monitor on after every epoch (400 train
/ 100 val images) and the collapse detector made to fire (every iteration
counts as suspect: ``LOSS_REL_TOLERANCE=1``, patience 3), so the warning
path runs for real.
"""

import subprocess
import sys
from pathlib import Path

ITERS_PER_EPOCH = 128 // 32
EPOCHS = 2
FREEZE = 2
PATIENCE = 3
KNN_TRAIN, KNN_VAL = 400, 100
_RUN = {}


def overrides(mnist_folder, ckpt: Path):
    m = "++config.SWAV_PLUGIN.MONITOR"
    return [
        "config=swav_plugin/pretrain/swav_quickstart",
        f"config.DATA.TRAIN.DATA_PATHS=[{mnist_folder['train']}]",
        "config.DATA.TRAIN.DATA_LIMIT=128",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        f"config.OPTIMIZER.num_epochs={EPOCHS}",
        f"config.LOSS.swav_plugin_loss.freeze_prototypes_niters={FREEZE}",
        "config.LOG_FREQUENCY=1",
        f"config.CHECKPOINT.DIR={ckpt}",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS=false",
        "config.HOOKS.TENSORBOARD_SETUP.LOG_PARAMS_GRADIENTS=false",
        f"{m}.COLLAPSE.START_ITER=0",
        f"{m}.COLLAPSE.PATIENCE_ITERS={PATIENCE}",
        f"{m}.COLLAPSE.LOSS_REL_TOLERANCE=1.0",
        f"{m}.KNN.ENABLED=true",
        f"{m}.KNN.EVERY_N_EPOCHS=1",
        f"{m}.KNN.TRAIN_PATH={mnist_folder['train']}",
        f"{m}.KNN.VAL_PATH={mnist_folder['val']}",
        f"{m}.KNN.TRAIN_LIMIT={KNN_TRAIN}",
        f"{m}.KNN.VAL_LIMIT={KNN_VAL}",
        f"{m}.KNN.RESIZE=null",
        f"{m}.KNN.CROP=null",
        f"{m}.KNN.NUM_WORKERS=0",
    ]


def trained_run(mnist_folder, tmp_path_factory):
    """The run's checkpoint folder (VISSL's checkpoints, log.txt,
    metrics.json, tb_logs/, train_config.yaml) and its overrides."""
    if "ckpt" not in _RUN:
        ckpt = tmp_path_factory.mktemp("monitored_run") / "checkpoints"
        ov = overrides(mnist_folder, ckpt)
        proc = subprocess.run(
            [sys.executable, "-m", "swav_vissl_plugin.launcher", *ov],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"monitored run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        _RUN.update(ckpt=ckpt, overrides=ov, stdout=proc.stdout + proc.stderr)
    return _RUN


def scalars(ckpt: Path):
    """{tag: [(step, value), ...]} of every TensorBoard event file under ``ckpt``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(Path(ckpt).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
