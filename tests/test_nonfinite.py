"""A non-finite loss stops a 2-rank run through VISSL's real trainer: every
rank names the iteration and the offending ranks, the offending ranks write
their scores, loss and data_idx, and no checkpoint holds the failing
iteration or anything after it.

The loss is made non-finite for real: the learning rate jumps from 0.1 to
1e38 at epoch 1 (VISSL's multistep schedule), the first update of epoch 1
makes the weights huge and the next forward pass overflows.
"""

import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BATCH, RANKS, CROPS = 8, 2, 6
ITERS_PER_EPOCH = 2  # 32 items / (2 ranks x 8)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    cls = root / "train" / "c"
    cls.mkdir(parents=True)
    for i in range(31):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cls / f"{i:03d}.png")
    (cls / "999_broken.png").write_bytes(b"not a png")  # counted in phase 0 over both ranks
    return root / "train"


def _launch(data: Path, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, str(REPO / "tools" / "run_distributed_engines.py"),
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={BATCH}",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={RANKS}",
            "config.OPTIMIZER.num_epochs=3",
            "config.OPTIMIZER.param_schedulers.lr.name=multistep",
            "config.OPTIMIZER.param_schedulers.lr.values=[0.1,1e38]",
            "config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
            "config.SWAV_PLUGIN.MONITOR.ENABLED=false",
            "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
            "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1",
            f"config.CHECKPOINT.DIR={run}",
        ],
        capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    data, run = _folder(root), root / "run"
    proc = _launch(data, run)
    return proc, data, run


def _failure(proc):
    """(iteration, offending ranks, {rank that raised}) from the ranks' error lines."""
    out = proc.stdout + proc.stderr
    found = re.findall(r"non-finite values at training iteration (\d+) .*? on rank\(s\) \[([\d, ]+)\] .*?raised on rank (\d+)", out)
    assert found, out[-4000:]
    iterations = {int(i) for i, _, _ in found}
    offending = {tuple(int(r) for r in rs.split(", ")) for _, rs, _ in found}
    assert len(iterations) == 1 and len(offending) == 1, found
    return iterations.pop(), offending.pop(), {int(r) for _, _, r in found}


def _checkpoints(run: Path):
    return sorted(p for p in run.glob("*.torch") if not p.is_symlink() and not p.name.startswith("nonfinite_"))


def _all_finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    return True


def test_every_rank_stops_naming_the_iteration_and_ranks(failed_run):
    proc, _, run = failed_run
    assert proc.returncode != 0
    iteration, offending, raised = _failure(proc)
    # epoch 0 (lr 0.1) trains; epoch 1's first update (lr 1e38) blows the weights up
    assert iteration >= ITERS_PER_EPOCH, iteration
    assert offending == (0, 1) and raised == {0, 1}
    assert "NonFiniteLossError" in proc.stderr
    for rank in offending:
        assert f"{run}/nonfinite_iter{iteration}_rank{rank}.torch" in proc.stdout + proc.stderr


def test_offending_ranks_write_their_scores_loss_and_data_idx(failed_run):
    proc, _, run = failed_run
    iteration, offending, _ = _failure(proc)
    for rank in offending:
        rec = torch.load(run / f"nonfinite_iter{iteration}_rank{rank}.torch", weights_only=True)
        assert rec["iteration"] == iteration and rec["rank"] == rank and rec["world_size"] == RANKS
        assert rec["train_phase_idx"] == iteration // ITERS_PER_EPOCH
        assert not math.isfinite(float(rec["loss"])) and not math.isfinite(float(rec["all_reduced_loss"]))
        embeddings, scores = rec["model_output"]
        assert scores.shape == (CROPS * BATCH, 100)  # 100 prototypes
        assert not bool(torch.isfinite(scores).all())
        assert rec["data_idx"].shape == (CROPS * BATCH,)
        assert "loss" in rec["reasons"] and "model output (prototype scores)" in rec["reasons"]


def test_no_checkpoint_holds_the_failing_iteration(failed_run):
    """Every checkpoint on disk (phase and iteration ones) holds a state from
    before the failing iteration, with finite weights, and was written before
    the failure was detected."""
    proc, _, run = failed_run
    iteration, _, _ = _failure(proc)
    ckpts = _checkpoints(run)
    names = [p.name for p in ckpts]
    assert any("phase0" in n for n in names), names  # epoch 0's checkpoint survives
    detected = min((run / f"nonfinite_iter{iteration}_rank{r}.torch").stat().st_mtime_ns for r in range(RANKS))
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # "iteration" counts completed updates: <= N excludes update N and later
        assert state["iteration"] <= iteration, (path.name, state["iteration"])
        assert _all_finite(state["classy_state_dict"]["base_model"]), path.name
        assert path.stat().st_mtime_ns < detected, path.name
    newest = max(ckpts, key=lambda p: torch.load(p, map_location="cpu", weights_only=True)["iteration"])
    assert torch.load(newest, map_location="cpu", weights_only=True)["iteration"] == iteration, newest.name


def test_the_phase_before_counted_the_unreadable_file_over_both_ranks(failed_run):
    proc, data, run = failed_run
    log = (run / "log.txt").read_text()
    lines = [l for l in log.splitlines() if "train phase 0:" in l and "unreadable" in l]
    assert len(lines) == 1 and "1 unreadable image(s)" in lines[0] and str(data / "c" / "999_broken.png") in lines[0], lines


@pytest.mark.slow
def test_rerunning_the_failed_command_leaves_the_last_good_checkpoint_alone(failed_run):
    """The same command again resumes from the newest checkpoint, fails at
    the same iteration, and leaves every checkpoint byte-for-byte (and its
    modification time) as it was."""
    proc, data, run = failed_run
    iteration, _, _ = _failure(proc)

    def snapshot():
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in _checkpoints(run)}

    before = snapshot()
    again = _launch(data, run)
    assert again.returncode != 0
    assert _failure(again)[0] == iteration
    assert snapshot() == before
