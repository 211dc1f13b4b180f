"""Exact resume after SIGKILL, atomic checkpoints, fallback from a damaged one.

Unit level (real files, real processes): the atomic writer under a SIGKILL
in the middle of a write, the choice of the resume checkpoint (newest by
training progress, a damaged one skipped with a warning naming it) against
VISSL's own choice, the readable-final check, pruning, the random-stream
round trip, the resumable sampler against ``DistributedSampler`` and VISSL's
``StatefulDistributedSampler``.

End to end (``tests/resume_run.py``: VISSL's launcher, 2 gloo ranks, the
plugin's hooks plus a trajectory probe): a run is SIGKILLed as a whole
process group (launcher, ranks, forkserver, loader workers) in the middle of
an iteration, the same command is run again, and every iteration the
interrupted runs executed must equal the uninterrupted run's bit for bit
(loss, learning rate, batch indices, prototypes, queue or memory bank, model,
random streams), as must the final checkpoints. SwAV with the queue and the
prototype freeze, crops made in a loader worker (also a second kill, then a
truncated newest checkpoint that the next run skips; 2 workers per rank in a
``slow`` test), DeepCluster-v2 with its memory bank. And a model that goes
non-finite on one rank is never checkpointed.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from swav_vissl_plugin import compat, rng_state
from swav_vissl_plugin.checkpoint_hook import (
    point_link,
    prune_iteration_checkpoints,
    remove_stale_temporaries,
    write_atomically,
)
from swav_vissl_plugin.resume import checkpoint_problem, find_resume_checkpoint

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _fake_training_checkpoint(path: Path, iteration: int, train_phase_idx: int, mode: str = "phase", pad: int = 0):
    """A checkpoint with VISSL's top-level layout and the plugin's metadata."""
    state = {
        "phase_idx": train_phase_idx,
        "iteration": iteration,
        "iteration_num": iteration + train_phase_idx,
        "train_phase_idx": train_phase_idx,
        "loss": {},
        "classy_state_dict": {"losses": [], "weights": torch.arange(pad, dtype=torch.float32)},
        "type": "consolidated",
        "swav_plugin": {"version": 1, "world_size": 1, "batch_size_per_gpu": 4, "global_batch_size": 4,
                        "iterations_per_phase": 4, "mode": mode, "rng": [rng_state.capture()]},
    }
    torch.save(state, path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_tensor_byte(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), int.from_bytes(
        data[info.header_offset + 28:info.header_offset + 30], "little"
    )
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _cfg(folder=None, iter_freq=3, overwrite=False, nth=1):
    from vissl.config import AttrDict

    return AttrDict(
        {
            "CHECKPOINT": {
                "DIR": str(folder),
                "AUTO_RESUME": True,
                "OVERWRITE_EXISTING": overwrite,
                "CHECKPOINT_ITER_FREQUENCY": iter_freq,
                "LATEST_CHECKPOINT_RESUME_FILE_NUM": nth,
            }
        }
    )


@pytest.fixture
def run_folder(tmp_path):
    """phase 0 (iteration 4), iteration 6, phase 1 (iteration 8), iteration 9."""
    _fake_training_checkpoint(tmp_path / "model_phase0.torch", 4, 0)
    _fake_training_checkpoint(tmp_path / "model_iteration6.torch", 6, 0, mode="iteration")
    _fake_training_checkpoint(tmp_path / "model_phase1.torch", 8, 1)
    _fake_training_checkpoint(tmp_path / "model_iteration9.torch", 9, 1, mode="iteration", pad=4096)
    return tmp_path


# --------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------
_WRITER = """
import sys, torch
from swav_vissl_plugin.checkpoint_hook import write_atomically
big = {"w": torch.ones(96 * 2**20 // 4)}  # 96 MiB: the write takes a while
write_atomically(sys.argv[1], lambda f: torch.save(big, f))
"""


def test_sigkill_during_a_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "model_phase1.torch"
    _fake_training_checkpoint(target, 8, 1)
    before = target.read_bytes()
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], start_new_session=True)
        caught = None
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".model_phase1.torch.tmp-")]
            if temps and temps[0].stat().st_size > 2**20:
                os.killpg(proc.pid, signal.SIGKILL)
                caught = temps[0]
                break
            time.sleep(0.002)
        proc.wait()
        if caught is not None:
            break
    assert caught is not None, "the writer finished before it could be killed mid-write"
    assert proc.returncode == -signal.SIGKILL
    # the kill left a partial temporary file and the previous checkpoint intact
    assert caught.exists() and caught.stat().st_size < 96 * 2**20
    assert target.read_bytes() == before
    assert checkpoint_problem(str(target)) is None
    assert find_resume_checkpoint(str(tmp_path)) == str(target)
    # the next run's checkpoint hook removes the leftover
    assert remove_stale_temporaries(str(tmp_path)) == [str(caught)]
    assert [p.name for p in tmp_path.iterdir()] == ["model_phase1.torch"]


def test_completed_write_replaces_the_file_and_the_link(tmp_path):
    _fake_training_checkpoint(tmp_path / "model_phase0.torch", 4, 0)
    point_link(str(tmp_path), "model_phase0.torch")
    write_atomically(str(tmp_path / "model_phase1.torch"), lambda f: torch.save({"x": torch.ones(3)}, f))
    point_link(str(tmp_path), "model_phase1.torch")
    link = tmp_path / "checkpoint.torch"
    assert os.readlink(link) == "model_phase1.torch"  # relative: the run folder can move
    assert torch.equal(torch.load(link, weights_only=True)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.torch", "model_phase0.torch", "model_phase1.torch"]


def test_a_failing_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model_phase0.torch"

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(str(target), fail)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# choosing the resume checkpoint
# --------------------------------------------------------------------------
def test_newest_by_training_progress_across_kinds(run_folder):
    from vissl.utils import distributed_launcher

    assert find_resume_checkpoint(str(run_folder)) == str(run_folder / "model_iteration9.torch")
    (run_folder / "model_iteration9.torch").unlink()
    # a phase checkpoint newer than every iteration checkpoint
    assert distributed_launcher.get_resume_checkpoint(_cfg(run_folder), str(run_folder)) == str(
        run_folder / "model_phase1.torch"
    )
    original = compat.ORIGINALS[(distributed_launcher.__name__, "get_resume_checkpoint")]
    assert original(_cfg(run_folder), str(run_folder)) == f"{run_folder}/model_iteration6.torch"


def test_before_any_iteration_checkpoint(tmp_path):
    from vissl.utils import distributed_launcher

    _fake_training_checkpoint(tmp_path / "model_phase0.torch", 4, 0)
    original = compat.ORIGINALS[(distributed_launcher.__name__, "get_resume_checkpoint")]
    assert original(_cfg(tmp_path), str(tmp_path)) == f"{tmp_path}/None"  # VISSL then crashes
    assert distributed_launcher.get_resume_checkpoint(_cfg(tmp_path), str(tmp_path)) == str(tmp_path / "model_phase0.torch")
    assert distributed_launcher.get_resume_checkpoint(_cfg(tmp_path / "empty"), str(tmp_path / "empty")) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "zero"])
def test_damaged_newest_is_skipped_with_a_warning_naming_it(run_folder, caplog, damage):
    from vissl.utils import distributed_launcher

    newest = run_folder / "model_iteration9.torch"
    if damage == "truncate":
        _truncate(newest)
    elif damage == "flip":  # one byte of tensor data: only the record CRC shows it
        _flip_tensor_byte(newest)
        torch.load(newest, weights_only=True)  # torch itself loads it without a complaint
    else:
        newest.write_bytes(b"")
    assert checkpoint_problem(str(newest)) is not None
    with caplog.at_level(logging.WARNING):
        chosen = distributed_launcher.get_resume_checkpoint(_cfg(run_folder), str(run_folder))
    assert chosen == str(run_folder / "model_phase1.torch")
    assert any(str(newest) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    original = compat.ORIGINALS[(distributed_launcher.__name__, "get_resume_checkpoint")]
    assert original(_cfg(run_folder), str(run_folder)) == f"{run_folder}/model_iteration9.torch"


def test_checkpoint_in_torchs_legacy_format_is_accepted(tmp_path):
    state = torch.load(_fake_training_checkpoint(tmp_path / "x.torch", 4, 0), weights_only=True)
    torch.save(state, tmp_path / "model_phase0.torch", _use_new_zipfile_serialization=False)
    (tmp_path / "x.torch").unlink()
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "model_phase0.torch")


def test_several_damaged_and_nth_latest(run_folder):
    _truncate(run_folder / "model_iteration9.torch")
    _truncate(run_folder / "model_phase1.torch")
    assert find_resume_checkpoint(str(run_folder)) == str(run_folder / "model_iteration6.torch")
    assert find_resume_checkpoint(str(run_folder), nth=2) == str(run_folder / "model_phase0.torch")
    assert find_resume_checkpoint(str(run_folder), nth=9) == str(run_folder / "model_phase0.torch")
    _truncate(run_folder / "model_iteration6.torch")
    _truncate(run_folder / "model_phase0.torch")
    assert find_resume_checkpoint(str(run_folder)) is None


def test_damaged_final_checkpoint_does_not_end_the_run(run_folder, caplog):
    from vissl.utils import distributed_launcher

    final = _fake_training_checkpoint(run_folder / "model_final_checkpoint_phase2.torch", 12, 2)
    assert distributed_launcher.is_training_finished(_cfg(run_folder), str(run_folder))
    _truncate(final)
    original = compat.ORIGINALS[(distributed_launcher.__name__, "is_training_finished")]
    assert original(_cfg(run_folder), str(run_folder))
    with caplog.at_level(logging.WARNING):
        assert not distributed_launcher.is_training_finished(_cfg(run_folder), str(run_folder))
    assert any(str(final) in r.getMessage() for r in caplog.records)
    assert find_resume_checkpoint(str(run_folder)) == str(run_folder / "model_iteration9.torch")


def test_pruning_keeps_the_newest_and_never_a_newer_one(tmp_path):
    for i in (3, 6, 9, 12, 15):
        _fake_training_checkpoint(tmp_path / f"model_iteration{i}.torch", i, 0, mode="iteration")
    _fake_training_checkpoint(tmp_path / "model_phase0.torch", 4, 0)
    removed = prune_iteration_checkpoints(str(tmp_path), current=12, keep=2)
    assert sorted(Path(p).name for p in removed) == ["model_iteration3.torch", "model_iteration6.torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_iteration12.torch", "model_iteration15.torch", "model_iteration9.torch", "model_phase0.torch"
    ]
    assert prune_iteration_checkpoints(str(tmp_path), current=12, keep=0) == []


# --------------------------------------------------------------------------
# loading: counters and random streams
# --------------------------------------------------------------------------
def test_iteration_checkpoint_counter_corrected_on_load(tmp_path):
    from vissl.trainer import train_task

    from swav_vissl_plugin.resume import resume_config

    path = _fake_training_checkpoint(tmp_path / "model_iteration6.torch", 6, 0, mode="iteration")
    saved = torch.load(path, weights_only=True)["iteration_num"]
    original = compat.ORIGINALS[(train_task.__name__, "CheckpointLoader")]
    assert original.load_and_broadcast_checkpoint(str(tmp_path), str(path), torch.device("cpu"))["iteration_num"] == saved
    with resume_config(None):
        loaded = train_task.CheckpointLoader.load_and_broadcast_checkpoint(str(tmp_path), str(path), torch.device("cpu"))
    assert loaded["iteration_num"] == saved - 1
    # a phase checkpoint's counter is right as saved
    phase = _fake_training_checkpoint(tmp_path / "model_phase0.torch", 4, 0)
    loaded = train_task.CheckpointLoader.load_and_broadcast_checkpoint(str(tmp_path), str(phase), torch.device("cpu"))
    assert loaded["iteration_num"] == torch.load(phase, weights_only=True)["iteration_num"]


def test_random_streams_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save({"rng": [rng_state.capture()]}, tmp_path / "s.torch")
    expected = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    rng_state.restore(torch.load(tmp_path / "s.torch", weights_only=True)["rng"][0])
    got = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# --------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------
def test_resumable_sampler_is_distributed_samplers_order_and_resumes(monkeypatch):
    from torch.utils.data.distributed import DistributedSampler
    from vissl import data

    original = compat.ORIGINALS[(data.__name__, "StatefulDistributedSampler")]
    n, world, batch, seed, epoch = 104, 2, 4, 31, 5

    def build(cls, rank, world_size=world):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: world_size)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: rank)
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        s = cls(list(range(n)), batch_size=batch, seed=seed)
        s.set_epoch(epoch)
        return s

    ours = [list(build(data.StatefulDistributedSampler, r)) for r in range(world)]
    ref = []
    for r in range(world):
        torch_ref = DistributedSampler(list(range(n)), num_replicas=world, rank=r, shuffle=True, seed=seed)
        torch_ref.set_epoch(epoch)
        ref.append(list(torch_ref))
    assert ours == ref
    # VISSL's sampler: rank 0 only ever sees the first half of the dataset
    vissl_rank0 = list(build(original, 0))
    assert max(vissl_rank0) < n // 2 and max(ours[0]) >= n // 2
    # resuming after 4 iterations yields the rest of the same epoch
    for r in range(world):
        s = build(data.StatefulDistributedSampler, r)
        s.set_start_iter(4)
        assert list(s) == ours[r][4 * batch:]
        assert len(s) == len(ours[r])  # len(loader) keeps counting the whole epoch
    # = skipping the first 4 x batch x world indices of the global order, so
    # 4 ranks resuming after the same 32 images see exactly the others
    seen = {i for r in range(world) for i in ours[r][: 4 * batch]}
    rest = []
    for r in range(4):
        s = build(data.StatefulDistributedSampler, r, world_size=4)
        s.set_start_iter(2)
        rest += list(s)
    assert seen.isdisjoint(rest) and seen | set(rest) == set(range(n))


# --------------------------------------------------------------------------
# end to end: SIGKILL, rerun, compare with the uninterrupted run
# --------------------------------------------------------------------------
ITERS_PER_EPOCH, EPOCHS = 4, 3  # 64 images, 2 ranks x 8
COMMON = [
    "config.DATA.TRAIN.DATA_LIMIT=64",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
    f"config.OPTIMIZER.num_epochs={EPOCHS}",
    "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=1",
    "config.MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS=[8,16,32]",
    "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
    "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
    "config.LOG_FREQUENCY=1",
    # loader workers forked from their rank: under the configs' forkserver each
    # worker of each epoch imports VISSL again, which doubles the test's time
    # here (the slow test keeps forkserver)
    "config.MULTI_PROCESSING_METHOD=fork",
]
FREEZE = 7  # prototypes frozen for iterations 0-6: the first resume (at 6) is inside the freeze


def _swav_overrides(train, workers: int = 1):
    # queue of 2 global batches from epoch 1: full after iterations 4 and 5
    return [
        "config=swav_plugin/pretrain/swav_quickstart",
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
        f"config.DATA.NUM_DATALOADER_WORKERS={workers}",
        "config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{in_dim:32,hidden_mlp:64,feat_dim:16,nmb_prototypes:20}]]",
        f"config.LOSS.swav_plugin_loss.freeze_prototypes_niters={FREEZE}",
        "config.LOSS.swav_plugin_loss.queue_length=32",
        "config.LOSS.swav_plugin_loss.epoch_queue_starts=1",
        *COMMON,
    ]


def _deepcluster_overrides(train, config="deepclusterv2_quickstart"):
    return [
        f"config=swav_plugin/pretrain/{config}",
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.MODEL.HEAD.PARAMS=[[swav_plugin_head,{in_dim:32,hidden_mlp:64,feat_dim:16,nmb_prototypes:[10,10,10]}]]",
        *COMMON,
    ]


def _session_processes(sid: int):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def _launch(folder: Path, overrides, run: str, kill: str = "", timeout: int = 900, **test_env) -> dict:
    """The same command each time; ``kill`` makes rank 0 SIGKILL the run's
    process group at that point (``test_env``: more of tests/resume_run.py's
    variables). Returns rc, output, and the processes of the run's session
    still alive afterwards (they are then killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_TEST_")}
    env.update(OMP_NUM_THREADS="1", SWAV_TEST_RUN=run, **{f"SWAV_TEST_{k.upper()}": v for k, v in test_env.items()})
    if kill:
        env["SWAV_TEST_KILL"] = kill
    cmd = [sys.executable, str(TESTS / "resume_run.py"), str(folder / "probe"), *overrides, f"config.CHECKPOINT.DIR={folder / 'ckpt'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        deadline, left = time.time() + 10, _session_processes(proc.pid)
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = _session_processes(proc.pid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return {"rc": proc.returncode, "out": out, "left": left}


def _records(folder: Path, rank: int):
    import json

    return [json.loads(line) for line in (folder / "probe" / f"probe_rank{rank}.jsonl").read_text().splitlines()]


def _assert_same_trajectory(reference: Path, interrupted: Path) -> list:
    """Every iteration the interrupted runs executed (some twice) equals the
    uninterrupted run's, field by field; returns the (run, iteration) order.
    Exact, floats included: the resumed run repeats the same computation on
    the same machine (same kernels, threads, inputs, restored random streams
    and sampler position), which the resume promises to be bit-identical."""
    order = []
    for rank in (0, 1):
        ref = {r["iteration"]: r for r in _records(reference, rank) if "start" not in r}
        assert sorted(ref) == list(range(ITERS_PER_EPOCH * EPOCHS))
        done = [r for r in _records(interrupted, rank) if "start" not in r]
        assert {r["iteration"] for r in done} == set(ref)
        for r in done:
            expected = {k: v for k, v in ref[r["iteration"]].items() if k != "run"}
            got = {k: v for k, v in r.items() if k != "run"}
            assert got == expected, (rank, r["run"], r["iteration"])
        order.append([(r["run"], r["iteration"]) for r in done])
    assert order[0] == order[1]
    return order[0]


def _assert_bitwise_equal(a, b, path="checkpoint"):
    # exact for the reason given in _assert_same_trajectory
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _final(folder: Path):
    return torch.load(folder / "ckpt" / f"model_final_checkpoint_phase{EPOCHS - 1}.torch", weights_only=True)


def _interrupted_flow(root: Path, overrides, kills, damage: str = "") -> dict:
    """Run A uninterrupted; run B killed at each of ``kills`` in turn (the
    same command rerun each time), ``damage`` (a checkpoint file of B)
    truncated, then B rerun to the end."""
    runs = {"A": _launch(root / "A", overrides, "A")}
    for n, kill in enumerate(kills, start=1):
        runs[f"B{n}"] = _launch(root / "B", overrides, f"B{n}", kill=kill)
    if damage:
        _truncate(root / "B" / "ckpt" / damage)
    runs[f"B{len(kills) + 1}"] = _launch(root / "B", overrides, f"B{len(kills) + 1}")
    return runs


def _assert_killed_and_resumed(root: Path, runs: dict, resumed) -> None:
    """The killed runs died by SIGKILL with every process of their session,
    the last one finished, and each rerun resumed from ``resumed``: a list of
    (iteration, checkpoint kind)."""
    last = max(runs)
    for name, r in runs.items():
        assert r["rc"] == (0 if name in ("A", last) else -signal.SIGKILL), (name, r["out"][-3000:])
        assert r["left"] == [], name
    starts = [(r["resumed_from"], r["mode"]) for r in _records(root / "B", 0) if "start" in r]
    assert starts == [(None, None), *resumed]


def _executions(kills, ends):
    """(run, iteration) of every iteration run B executed, in order, when its
    n-th run starts at ``ends[n - 1]`` and is killed in iteration ``kills[n]``."""
    stops = [int(k.split(":")[0]) for k in kills] + [ITERS_PER_EPOCH * EPOCHS]
    return [(f"B{n + 1}", i) for n, (a, b) in enumerate(zip([0, *ends], stops)) for i in range(a, b)]


SWAV_KILLS = ["7:on_forward"]  # newest checkpoint: iteration 6 (inside the freeze, queue full)


@pytest.fixture(scope="module")
def swav_runs(tmp_path_factory, mnist_folder):
    """SwAV, the crops made in one loader worker per rank: killed in
    iteration 7, resumed from the iteration-6 checkpoint."""
    root = tmp_path_factory.mktemp("resume_swav")
    return root, _interrupted_flow(root, _swav_overrides(mnist_folder["train"], workers=1), SWAV_KILLS)


def test_swav_sigkill_ends_every_process_and_the_rerun_resumes(swav_runs):
    root, runs = swav_runs
    _assert_killed_and_resumed(root, runs, [(6, "iteration")])
    # the resume loader got this run's config (compat.patch_trainer_resume_context)
    assert "resuming at iteration 6 (epoch 1, 2 of 4 iterations done), written by 2 rank(s) x 8 images " \
           "(iteration checkpoint); this run: 2 rank(s) x 8 images" in runs["B2"]["out"]


def test_swav_resumed_iterations_equal_the_uninterrupted_run(swav_runs):
    root, _ = swav_runs
    assert _assert_same_trajectory(root / "A", root / "B") == _executions(SWAV_KILLS, [6])
    ref = [r for r in _records(root / "A", 0) if "start" not in r]
    # the resume fell inside the prototype freeze and while the queue was in use
    assert len({r["prototypes"] for r in ref[:FREEZE]}) == 1 and ref[FREEZE]["prototypes"] != ref[FREEZE - 1]["prototypes"]
    assert len({r["loss_state"] for r in ref[4:]}) == len(ref) - 4
    assert ref[6]["lr"] != ref[7]["lr"]  # the schedule moves across the resume


def test_swav_final_checkpoints_bitwise_equal(swav_runs):
    root, _ = swav_runs
    a, b = _final(root / "A"), _final(root / "B")
    assert a["loss"]["queue"] is not None
    _assert_bitwise_equal(a, b)


TWO_KILLS = ["7:on_forward", "10:on_backward"]  # newest checkpoints: iteration 6, then iteration 9


@pytest.mark.slow
def test_swav_resume_exact_with_two_loader_workers_per_rank(tmp_path, mnist_folder):
    """SwAV with 2 loader workers per rank (started by the configs'
    forkserver), so a resumed epoch's batches go to other workers than in the
    uninterrupted run: killed twice, the newest checkpoint truncated after
    the second kill."""
    ov = _swav_overrides(mnist_folder["train"], workers=2) + ["config.MULTI_PROCESSING_METHOD=forkserver"]
    runs = _interrupted_flow(tmp_path, ov, TWO_KILLS, damage="model_iteration9.torch")
    _assert_killed_and_resumed(tmp_path, runs, [(6, "iteration"), (8, "phase")])
    assert _assert_same_trajectory(tmp_path / "A", tmp_path / "B") == _executions(TWO_KILLS, [6, 8])
    _assert_bitwise_equal(_final(tmp_path / "A"), _final(tmp_path / "B"))


@pytest.fixture(scope="module")
def deepcluster_runs(tmp_path_factory, mnist_folder):
    """DeepCluster-v2 (memory bank, k-means each epoch): killed in iteration 7
    (resumed from iteration 6, inside epoch 1), then in iteration 10; the
    newest checkpoint (iteration 9) is then truncated, so the last run
    resumes from the phase-1 checkpoint, at the start of epoch 2."""
    root = tmp_path_factory.mktemp("resume_dc")
    ov = _deepcluster_overrides(mnist_folder["train"])
    return root, _interrupted_flow(root, ov, TWO_KILLS, damage="model_iteration9.torch")


def test_deepcluster_resumes_on_the_same_trajectory(deepcluster_runs):
    root, runs = deepcluster_runs
    _assert_killed_and_resumed(root, runs, [(6, "iteration"), (8, "phase")])
    assert "epoch 1 resumed mid-way: clustering restored from the checkpoint" in runs["B2"]["out"]
    assert _assert_same_trajectory(root / "A", root / "B") == _executions(TWO_KILLS, [6, 8])
    a, b = _final(root / "A"), _final(root / "B")
    assert a["loss"]["memory_embeddings"] is not None
    _assert_bitwise_equal(a, b)


def test_truncated_newest_checkpoint_is_named_and_skipped(deepcluster_runs):
    root, runs = deepcluster_runs
    damaged = root / "B" / "ckpt" / "model_iteration9.torch"
    assert f"checkpoint {damaged} is unreadable" in runs["B3"]["out"]
    assert f"Resume from file: {root / 'B' / 'ckpt' / 'model_phase1.torch'}" in runs["B3"]["out"]
    # the resumed run wrote a new iteration-9 checkpoint over the damaged one, atomically
    assert checkpoint_problem(str(damaged)) is None


@pytest.mark.slow
def test_selav2_resumes_on_the_same_trajectory(tmp_path, mnist_folder):
    """SeLa-v2 (memory bank, Sinkhorn labels each epoch, learned prototypes):
    the DeepCluster-v2 flow above, incl. the truncated newest checkpoint."""
    ov = _deepcluster_overrides(mnist_folder["train"], "selav2_quickstart")
    runs = _interrupted_flow(tmp_path, ov, TWO_KILLS, damage="model_iteration9.torch")
    _assert_killed_and_resumed(tmp_path, runs, [(6, "iteration"), (8, "phase")])
    assert _assert_same_trajectory(tmp_path / "A", tmp_path / "B") == _executions(TWO_KILLS, [6, 8])
    a, b = _final(tmp_path / "A"), _final(tmp_path / "B")
    assert a["loss"]["memory_embeddings"] is not None
    _assert_bitwise_equal(a, b)


def test_no_checkpoint_at_or_after_a_non_finite_model(tmp_path, mnist_folder):
    """Rank 1's prototypes turn NaN after the update of iteration 3 (rank 0's
    stay finite), with the plugin's non-finite stop left out so the run goes
    on: the iteration-3 checkpoint is the last one written; the phase-0,
    iteration-6 and final checkpoints are refused on every rank."""
    ov = [o for o in _swav_overrides(mnist_folder["train"]) if not o.startswith("config.OPTIMIZER.num_epochs")]
    ov += ["config.OPTIMIZER.num_epochs=2", "config.DATA.NUM_DATALOADER_WORKERS=0"]
    r = _launch(tmp_path, ov, "nan", poison="3:1", drop_hooks="NonFiniteLossHook")
    assert r["rc"] == 0, r["out"][-3000:]
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.torch")) == ["checkpoint.torch", "model_iteration3.torch"]
    assert os.readlink(ckpt / "checkpoint.torch") == "model_iteration3.torch"
    state = torch.load(ckpt / "model_iteration3.torch", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["classy_state_dict"]["base_model"]["model"]["heads"].values())
    assert "non-finite parameter at iteration 4 on rank 1" in r["out"]
    assert "phase checkpoint 0 not written" in r["out"]
