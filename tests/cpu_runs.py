"""Short CPU trainings through VISSL's real trainer, for several test modules.

Each group of runs goes through ``tests/tiny_runs.py`` in one subprocess (one
interpreter start for all its runs). :func:`default_runs` is computed once
per test session and shared by ``test_train_step.py``, ``test_linear_eval.py``
and ``test_model_zoo.py``.
"""

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

TESTS = Path(__file__).resolve().parent
CPU = [
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.DISTRIBUTED.NUM_NODES=1",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
    "config.DISTRIBUTED.BACKEND=gloo",
    "config.MACHINE.DEVICE=cpu",
    "config.LOG_FREQUENCY=1",
]


def run_specs(specs: List[dict], folder: Path, timeout: int = 1200) -> Dict[str, dict]:
    """Runs ``specs`` (see tiny_runs.py) in one subprocess; name -> record."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file, results = folder / "spec.json", folder / "results.json"
    spec_file.write_text(json.dumps(specs))
    proc = subprocess.run(
        [sys.executable, str(TESTS / "tiny_runs.py"), str(spec_file), str(results)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if not results.exists():
        raise RuntimeError(f"tiny_runs.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(results.read_text())
    missing = [s["name"] for s in specs if s["name"] not in out]
    if missing:
        raise RuntimeError(f"runs {missing} did not finish (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def quickstart_pretrain(name: str, train: str, ckpt: Path, batch: int = 16, autocast=None) -> dict:
    """swav_quickstart on 2 x ``batch`` images: 2 iterations of 1 epoch, prototypes frozen for the first."""
    return {
        "name": name,
        "autocast": autocast,
        "overrides": [
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
            f"config.DATA.TRAIN.DATA_LIMIT={2 * batch}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
            "config.OPTIMIZER.num_epochs=1",
            "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
            "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=1",
            f"config.CHECKPOINT.DIR={ckpt}",
            *CPU,
        ],
    }


#: The ResNet-50 row of the default suite: the bs256 row (queue, 0.6 per 256,
#: 5005-iteration freeze, everything else from swav_base).
DEFAULT_RESNET50_ROWS = ("swav_200ep_bs256",)
#: The other ResNet-50 rows: ``slow`` tests (``make test-slow``). Rows 2-4 and
#: 6 differ from rows 1 and 5 only in epochs, which a 1-epoch run overrides.
OTHER_RESNET50_ROWS = ("swav_800ep", "swav_400ep_2x224", "swav_400ep", "swav_200ep", "swav_100ep", "swav_400ep_bs256")
WIDE_ROWS = ("swav_RN50w2_400ep", "swav_RN50w4_400ep", "swav_RN50w5_400ep")
TINY_BATCH = 2
TINY_SIZES = {224: 32, 160: 24, 96: 16}


def row_tiny_run(row: str, train: str, ckpt: Path) -> dict:
    """A model-zoo row for 2 iterations on one CPU process at tiny resolution.

    Changed from the row: CPU (one process, gloo, no SyncBN, no AMP: both
    GPU-only), batch 2 per process, crops resized 224 -> 32, 96 -> 16
    (numbers and scales kept), 1 epoch of 2 iterations without warmup (so the
    schedule fits). Everything else (trunk, head, loss, queue, freeze, LARC,
    LR rule, train step, hooks) is the row's, inferred for a global batch of 2.
    """
    from swav_vissl_plugin.config import compose

    with tempfile.TemporaryDirectory() as tmp:
        _, cfg = compose([f"config=swav_plugin/pretrain/{row}", f"config.CHECKPOINT.DIR={tmp}"], dump_config=False)
    sizes = [TINY_SIZES[s] for s in cfg.DATA.TRAIN.TRANSFORMS[0]["size_crops"]]
    return {
        "name": f"row:{row}",
        "overrides": [
            f"config=swav_plugin/pretrain/{row}",
            f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
            f"config.DATA.TRAIN.DATA_LIMIT={2 * TINY_BATCH}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={TINY_BATCH}",
            f"config.DATA.TRAIN.TRANSFORMS.0.size_crops=[{','.join(map(str, sizes))}]",
            "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=false",
            "config.MODEL.AMP_PARAMS.USE_AMP=false",
            "config.OPTIMIZER.num_epochs=1",
            "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
            f"config.CHECKPOINT.DIR={ckpt}",
            *CPU,
        ],
    }


def _tmp_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=None)
def default_runs(train: str, val: str) -> Dict[str, dict]:
    """All CPU trainings of the default suite, in one subprocess, once per session:

    * ``pretrain_fp32`` / ``pretrain_bf16`` / ``pretrain_fp16``: swav_quickstart
      (2 iterations) in full precision and under autocast;
    * ``linear_eval``: the CPU linear evaluation (2 epochs, 128 train / 64 test
      images, batch 32) of the ``pretrain_fp32`` checkpoint;
    * ``row:<name>``: :func:`row_tiny_run` of each of ``DEFAULT_RESNET50_ROWS``.
    """
    folder = _tmp_folder("swav_cpu_runs_")
    pre = folder / "pretrain_fp32"
    specs = [
        quickstart_pretrain("pretrain_fp32", train, pre),
        # half-precision convolutions are slow on CPU: batch 4
        quickstart_pretrain("pretrain_bf16", train, folder / "pretrain_bf16", batch=4, autocast="bfloat16"),
        quickstart_pretrain("pretrain_fp16", train, folder / "pretrain_fp16", batch=4, autocast="float16"),
        {
            "name": "linear_eval",
            "overrides": [
                "config=swav_plugin/linear_eval/swav_quickstart_linear",
                f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
                f"config.DATA.TEST.DATA_PATHS=[{val}]",
                "config.DATA.TRAIN.DATA_LIMIT=128",
                "config.DATA.TEST.DATA_LIMIT=64",
                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
                "config.DATA.TEST.BATCHSIZE_PER_REPLICA=32",
                "config.OPTIMIZER.num_epochs=2",
                f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pre / 'model_final_checkpoint_phase0.torch'}",
                f"config.CHECKPOINT.DIR={folder / 'linear_eval'}",
                *CPU,
            ],
        },
    ]
    specs += [row_tiny_run(row, train, folder / row) for row in DEFAULT_RESNET50_ROWS]
    return run_specs(specs, folder)


def slow_row_runs(train: str, rows: Sequence[str]) -> Dict[str, dict]:
    """:func:`row_tiny_run` of ``rows`` in one subprocess (the slow target)."""
    folder = _tmp_folder("swav_slow_runs_")
    return run_specs([row_tiny_run(row, train, folder / row) for row in rows], folder, timeout=3000)
