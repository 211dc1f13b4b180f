"""``scontrol requeue`` of a running job, on a real single-node Slurm cluster.

Issue requirement "Preemption on Slurm": a job that is requeued resumes from
its last checkpoint and finishes with nothing lost. The ``USR2`` path
(time limit, preemption signal: submitit's ``SlurmJob.checkpoint``) is tested
in tests/test_slurm.py; this module covers a requeue that Slurm itself does
(``scontrol requeue <job id>`` on the running job).

What Slurm 22.05 and submitit 1.5.4 do then (observed here, asserted below):
slurmctld terminates the job like a cancel ("CANCELLED ... DUE TO JOB
REQUEUE"): every process of the job gets ``SIGCONT`` and ``SIGTERM``, then
``SIGKILL`` after ``KillWait``. No ``USR2`` is sent, so submitit's
checkpoint handler does not run: submitit's own process logs "Bypassing
signal SIGTERM" and keeps going, but the two ranks, which have no handler,
die, ``torch.multiprocessing.spawn`` raises, and submitit writes
``("error", <traceback>)`` as the job's result. The job goes back to PENDING
with the same id (``Restarts=1``) and, once it runs again, unpickles the
same, unchanged ``<job id>_submitted.pkl``: VISSL's auto-resume (on in the
plugin's configs) loads the newest checkpoint in the run directory, and the
finished run overwrites the result with ``("success", None)``.

Flow: an uninterrupted reference job, then the same row as a second job,
requeued with ``scontrol requeue`` as soon as its iteration-5 checkpoint
file exists (written atomically: its name appears only when it is
complete). Whatever the job writes until the kill lands, the test takes the
newest checkpoint present once the job is PENDING again, and the requeued
run must resume from exactly that file. The final checkpoints of both jobs
(model, optimizer, SwAV queue, counters, random streams) must be equal bit
for bit.

2 gloo ranks, 3 epochs of 4 iterations, two jobs: about 2 minutes, ``slow``.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_resume import _assert_bitwise_equal
from test_slurm import JOB_TIMEOUT_S, REPO, _job_log, _overrides, _result, _wait_for, cluster, small_folder  # noqa: F401

EPOCHS, ITERS_PER_EPOCH = 3, 4  # 64 images, 2 ranks x 8
ITER_CKPT = 5  # iteration checkpoints at 5 and 10, phase checkpoints at 4, 8 and 12 (final)
REQUEUE_AFTER = f"model_iteration{ITER_CKPT}.torch"


def _row(data: Path, run_dir: Path, name: str):
    """test_slurm's tiny quickstart row, with iteration checkpoints and the SwAV queue in use."""
    return _overrides(data, run_dir, name) + [
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        f"config.OPTIMIZER.num_epochs={EPOCHS}",
        f"config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY={ITER_CKPT}",
        "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=7",
        "config.LOSS.swav_plugin_loss.queue_length=32",
        "config.LOSS.swav_plugin_loss.epoch_queue_starts=1",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
    ]


def _submit(data: Path, run_dir: Path, name: str) -> str:
    """Submit the row with the real command line; returns the Slurm job id."""
    cmd = [sys.executable, str(REPO / "tools" / "run_distributed_engines.py"), *_row(data, run_dir, name)]
    # one thread per rank in both jobs: CPU results are bit-identical only at
    # the same thread count (docs/checkpointing.md); sbatch exports this environment
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"SUBMITTED: (\d+)", proc.stdout)
    assert m, proc.stdout[-3000:]
    return m.group(1)


def _progress(path: Path):
    """Training progress of a checkpoint file, read from the file: (updates done,
    phase after iteration checkpoint at the same step)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["iteration"]), 0 if path.name.startswith("model_iteration") else 1


def _newest_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.glob("model_*.torch"), key=_progress)


def _final(run_dir: Path):
    return torch.load(run_dir / f"model_final_checkpoint_phase{EPOCHS - 1}.torch", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(cluster, small_folder, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("requeue")
    t0 = time.monotonic()

    reference = root / "reference"
    ref_id = _submit(small_folder, reference, "swav-reference")
    ref_state = cluster.wait_finished(ref_id, JOB_TIMEOUT_S)

    run_dir = root / "requeued"
    job_id = _submit(small_folder, run_dir, "swav-requeued")
    log_folder = run_dir / "slurm"
    _wait_for("submitted pickle", (log_folder / f"{job_id}_submitted.pkl").exists, 60, cluster, job_id)
    submitted = (log_folder / f"{job_id}_submitted.pkl").read_bytes()
    _wait_for(REQUEUE_AFTER, (run_dir / REQUEUE_AFTER).exists, JOB_TIMEOUT_S, cluster, job_id, log_folder)
    state_at_requeue = cluster.job_state(job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, env={**os.environ, **cluster.env()}, timeout=60)

    # PENDING again: every process of the first run has ended, nothing writes
    # to the run directory until the job starts again (CRED_EXPIRE_S later)
    _wait_for("PENDING after the requeue", lambda: cluster.job_state(job_id) == "PENDING", 120, cluster, job_id, log_folder)
    newest_at_kill = _newest_checkpoint(run_dir)
    result_while_pending = _result(log_folder, job_id)
    submitted_while_pending = (log_folder / f"{job_id}_submitted.pkl").read_bytes()

    state = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    return dict(
        cluster=cluster,
        reference=reference,
        ref_id=ref_id,
        ref_state=ref_state,
        run_dir=run_dir,
        job_id=job_id,
        log_folder=log_folder,
        state_at_requeue=state_at_requeue,
        newest_at_kill=newest_at_kill,
        result_while_pending=result_while_pending,
        submitted=submitted,
        submitted_while_pending=submitted_while_pending,
        state=state,
        wall_s=time.monotonic() - t0,
    )


def _stdout_per_run(log_folder: Path, job_id: str):
    """The job's stdout (appended to by every run of the job id), one part per
    run: submitit starts each with "Starting with JobEnvironment"."""
    out = (log_folder / f"{job_id}_0_log.out").read_text(errors="replace")
    return re.split(r"^submitit INFO .* - Starting with JobEnvironment", out, flags=re.M)[1:]


@pytest.mark.slow
def test_scontrol_requeue_terminates_the_job_without_submitits_checkpoint(runs):
    r = runs
    assert r["state_at_requeue"] == "RUNNING"
    first, second = _stdout_per_run(r["log_folder"], r["job_id"])
    err = (r["log_folder"] / f"{r['job_id']}_0_log.err").read_text(errors="replace")
    # Slurm ended the first run as a cancellation, with SIGCONT and SIGTERM
    assert f"*** JOB {r['job_id']} ON {r['cluster'].node} CANCELLED AT" in err and "DUE TO JOB REQUEUE ***" in err
    assert "Bypassing signal SIGCONT" in first and "Bypassing signal SIGTERM" in first
    # no USR2: submitit's checkpoint handler and SlurmJob.checkpoint never ran
    for text in (first, second, err):
        assert "SIGUSR2" not in text and "SlurmJob.checkpoint" not in text and "Requeued job" not in text
    # the ranks died of the SIGTERM and submitit recorded the run as failed ...
    assert "Submitted job triggered an exception" in first
    assert len(re.findall(r"ProcessExitedException: process \d terminated with signal SIGTERM", err)) == 1, err[-3000:]
    outcome, detail = r["result_while_pending"]
    assert outcome == "error" and "terminated with signal SIGTERM" in detail, detail[-2000:]
    # ... then the same job id ran the unchanged submitted pickle again and succeeded
    assert r["submitted_while_pending"] == r["submitted"]
    assert (r["log_folder"] / f"{r['job_id']}_submitted.pkl").read_bytes() == r["submitted"]
    assert "Job completed successfully" in second and "Job completed successfully" not in first
    assert r["cluster"].job_field(r["job_id"], "Restarts") == "1"
    assert r["state"] == "COMPLETED", (r["state"], second[-3000:])
    assert _result(r["log_folder"], r["job_id"]) == ("success", None)


@pytest.mark.slow
def test_requeued_job_resumed_from_the_newest_checkpoint(runs):
    r = runs
    newest = r["newest_at_kill"]
    done, _ = _progress(newest)
    # the kill came after the iteration-5 checkpoint and before the end
    assert ITER_CKPT <= done < EPOCHS * ITERS_PER_EPOCH, newest
    first, second = _stdout_per_run(r["log_folder"], r["job_id"])
    assert "Resume from file" not in first
    resumed = re.findall(r"Resume from file: (\S+)", second)
    assert resumed == [str(newest)], (resumed, sorted(p.name for p in r["run_dir"].glob("*.torch")))
    epoch, into = divmod(done, ITERS_PER_EPOCH)
    assert f"resuming at iteration {done} (epoch {epoch}, {into} of {ITERS_PER_EPOCH} iterations done)" in second
    assert "Loaded loss state from checkpoint" in second
    # the requeued run trained only what was not done: every checkpoint it
    # wrote is past the one it resumed from
    saved = [Path(p) for p in re.findall(r"Saved checkpoint: (\S+)", second)]
    assert saved and min(_progress(p)[0] for p in saved) > done, saved
    # the uninterrupted reference job never resumed
    assert "Resume from file" not in _job_log(r["reference"] / "slurm", r["ref_id"])


@pytest.mark.slow
def test_requeued_job_final_checkpoint_bitwise_equals_the_uninterrupted_job(runs):
    r = runs
    assert r["ref_state"] == "COMPLETED", _job_log(r["reference"] / "slurm", r["ref_id"])[-3000:]
    assert r["state"] == "COMPLETED"
    a, b = _final(r["reference"]), _final(r["run_dir"])
    assert a["iteration"] == EPOCHS * ITERS_PER_EPOCH and a["phase_idx"] == EPOCHS - 1
    assert a["loss"]["queue"] is not None  # the queue was in use across the requeue
    # the parts that carry the training state, named, then everything else in the file
    for key in ("base_model", "optimizer"):
        _assert_bitwise_equal(a["classy_state_dict"][key], b["classy_state_dict"][key], key)
    _assert_bitwise_equal(a["loss"], b["loss"], "loss")
    _assert_bitwise_equal(a, b)
    print(f"reference + requeued job: {r['wall_s']:.0f} s")
