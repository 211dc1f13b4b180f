"""Slurm through submitit, on a real single-node Slurm cluster on localhost.

The module starts slurmctld + slurmd (tests/slurm_cluster.py), then:

* submits a tiny CPU version of the quickstart row with the real command line
  (``tools/run_distributed_engines.py ... config.SLURM.USE_SLURM=true``):
  one Slurm task spawning 2 gloo ranks through VISSL's ``launch_distributed``,
  2 epochs of 2 iterations;
* as soon as the first epoch's checkpoint is complete, sends the job
  ``USR2`` (what Slurm sends before a time limit with submitit's
  ``--signal=USR2@90``, and what ``submitit``'s own ``_interrupt`` sends):
  submitit calls ``SlurmJob.checkpoint``, requeues the job, and the second run
  must resume from VISSL's last checkpoint and finish;
* submits VISSL's own job class with the same config, which must fail: the
  checks below are what tells a job that imported the plugin from one that
  did not.

Skipped, with the reason, where slurmctld/slurmd/munged are not installed
(``.ci/run`` installs the Debian packages ``slurm-wlm`` and ``munge``).
"""

import os
import pickle
import pickletools
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from tolerances import unit_norm_tol

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
ITERS_PER_EPOCH = 2  # DATA_LIMIT 64 / (2 ranks x 16)
JOB_TIMEOUT_S = 300


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF",)}
    with slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        os.environ.update(c.env())  # submitit's sbatch/scontrol calls, and the jobs, use it
        try:
            yield c
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """96 real MNIST images (the quickstart's sample) as an image folder."""
    from PIL import Image

    from swav_vissl_plugin.quickstart import load_mnist5k

    root = tmp_path_factory.mktemp("images")
    images, labels = load_mnist5k()
    for i in range(96):
        d = root / str(int(labels[i]))
        d.mkdir(exist_ok=True)
        Image.fromarray(images[i], mode="L").save(d / f"{i:05d}.png")
    return root


def _overrides(data: Path, run_dir: Path, name: str):
    return [
        "config=swav_plugin/pretrain/swav_quickstart",
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        "config.DATA.TRAIN.DATA_LIMIT=64",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DISTRIBUTED.NUM_NODES=1",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        f"config.OPTIMIZER.num_epochs={EPOCHS}",
        "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
        "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=1",
        f"config.CHECKPOINT.DIR={run_dir}",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
        "config.LOG_FREQUENCY=1",
        "config.SLURM.USE_SLURM=true",
        f"config.SLURM.NAME={name}",
        "config.SLURM.PARTITION=debug",
        "config.SLURM.TIME_HOURS=0",
        "config.SLURM.TIME_MINUTES=20",
        "config.SLURM.MEM_GB=1",
        "config.SLURM.NUM_CPU_PER_PROC=1",
        f"config.SLURM.PORT_ID={slurm_cluster._free_port()}",
    ]


def _wait_for(what, ok, timeout, cluster, job_id, log_folder=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if cluster.job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.2)
    if not ok():
        log = _job_log(log_folder, job_id)[-4000:] if log_folder else ""
        pytest.fail(f"job {job_id}: no {what} ({cluster.job_state(job_id)})\n{log}\n{cluster.logs()}")


def _result(log_folder: Path, job_id: str):
    path = log_folder / f"{job_id}_0_result.pkl"
    assert path.exists(), f"no submitit result pickle {path}: {sorted(p.name for p in log_folder.iterdir())}"
    with open(path, "rb") as f:
        return pickle.load(f)


def _job_log(log_folder: Path, job_id: str) -> str:
    return "\n".join(
        (log_folder / f"{job_id}_0_log.{ext}").read_text(errors="replace")
        for ext in ("out", "err")
        if (log_folder / f"{job_id}_0_log.{ext}").exists()
    )


def _modules_in_load_order(pickle_path: Path):
    """Modules that unpickling ``pickle_path`` imports, in the order it imports them."""
    memo, recent, modules = [], [], []
    for op, arg, _ in pickletools.genops(pickle_path.read_bytes()):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            recent.append(arg)
        elif op.name == "MEMOIZE":
            memo.append(recent[-1] if recent else None)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo[int(arg)])
        elif op.name == "STACK_GLOBAL":
            modules.append(recent[-2])
        elif op.name == "GLOBAL":
            modules.append(arg.split(" ")[0])
        else:
            recent.append(None)
    first_seen = []
    for m in modules:
        if m not in first_seen:
            first_seen.append(m)
    return first_seen


def _first_project_module(pickle_path: Path) -> str:
    """The first module outside submitit/the standard library that the job's pickle imports."""
    for m in _modules_in_load_order(pickle_path):
        if m.split(".")[0] in ("swav_vissl_plugin", "vissl", "classy_vision", "torch", "omegaconf", "hydra"):
            return m
    return ""


@pytest.fixture(scope="module")
def preempted_run(cluster, small_folder, tmp_path_factory):
    """Submit with the command line, preempt after epoch 0, let the requeued job finish."""
    run_dir = tmp_path_factory.mktemp("run") / "swav_tiny"
    cmd = [sys.executable, str(REPO / "tools" / "run_distributed_engines.py"), *_overrides(small_folder, run_dir, "swav-tiny")]
    # Submitted from the repository root: the source tree there must not shadow
    # the installed plugin in the job.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"SUBMITTED: (\d+)", proc.stdout)
    assert m, proc.stdout[-3000:]
    job_id = m.group(1)
    log_folder = run_dir / "slurm"
    submitted = tmp_path_factory.mktemp("pickles") / "submitted.pkl"
    _wait_for("submitted pickle", (log_folder / f"{job_id}_submitted.pkl").exists, 60, cluster, job_id)
    submitted.write_bytes((log_folder / f"{job_id}_submitted.pkl").read_bytes())

    # epoch 0's checkpoint is complete once VISSL has pointed checkpoint.torch at it
    _wait_for("epoch-0 checkpoint", (run_dir / "checkpoint.torch").exists, JOB_TIMEOUT_S, cluster, job_id, log_folder)
    finished_early = any(run_dir.glob("model_final_checkpoint_phase*.torch"))
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env={**os.environ, **cluster.env()})
    state = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    return dict(
        cluster=cluster,
        job_id=job_id,
        run_dir=run_dir,
        log_folder=log_folder,
        state=state,
        finished_early=finished_early,
        cli_stdout=proc.stdout,
        cli_args=cmd,
        submitted_pickle=submitted,
    )


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_job_finished_and_wrote_one_run_directory(preempted_run):
    r = preempted_run
    run_dir, logs = r["run_dir"], r["log_folder"]
    assert r["state"] == "COMPLETED", (r["state"], _job_log(logs, r["job_id"])[-4000:])
    assert f"run directory: {run_dir}" in r["cli_stdout"]
    assert _result(logs, r["job_id"])[0] == "success", _result(logs, r["job_id"])
    # VISSL's checkpoints, log and config, and submitit's files, all under the run directory
    final = run_dir / f"model_final_checkpoint_phase{EPOCHS - 1}.torch"
    assert final.exists(), sorted(p.name for p in run_dir.iterdir())
    for name in ("log.txt", "train_config.yaml", "model_phase0.torch"):
        assert (run_dir / name).exists(), name
    for suffix in ("_submission.sh", "_0_log.out", "_0_log.err", "_submitted.pkl", "_0_result.pkl"):
        assert (logs / f"{r['job_id']}{suffix}").exists(), suffix
    log = (run_dir / "log.txt").read_text()
    assert f"Saved checkpoint: {final}" in log
    # one Slurm task, two gloo ranks spawned by VISSL's launch_distributed,
    # meeting on the job's first node at SLURM.PORT_ID
    job_log = _job_log(logs, r["job_id"])
    port = re.search(r"config\.SLURM\.PORT_ID=(\d+)", " ".join(r["cli_args"])).group(1)
    for rank in (0, 1):
        assert f"init method: tcp://{r['cluster'].node}:{port}, world_size: 2, rank: {rank}" in job_log, rank
    assert "'BACKEND': 'gloo'" in log


def test_final_checkpoint_is_the_plugins_model(preempted_run):
    import yaml
    from vissl.config import AttrDict
    from vissl.models import build_model

    r = preempted_run
    final = r["run_dir"] / f"model_final_checkpoint_phase{EPOCHS - 1}.torch"
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert state["iteration"] == EPOCHS * ITERS_PER_EPOCH and state["phase_idx"] == EPOCHS - 1
    assert "loss" in state  # the plugin's loss state (queue) travels with the checkpoint
    cfg = AttrDict(yaml.safe_load((r["run_dir"] / "train_config.yaml").read_text()))
    assert cfg.MODEL.TRUNK.NAME == "swav_plugin_small_cnn"
    assert cfg.CHECKPOINT.DIR == str(r["run_dir"]) and cfg.SLURM.LOG_FOLDER == str(r["log_folder"])
    model = build_model(cfg.MODEL, cfg.OPTIMIZER)
    model.set_classy_state(state["classy_state_dict"]["base_model"])
    protos = model.heads[0].prototype_parameters()[0]
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(protos.shape[0]), rtol=0, atol=unit_norm_tol(protos.shape[1]))


def test_job_imported_the_installed_plugin_before_vissl(preempted_run):
    import swav_vissl_plugin
    from swav_vissl_plugin.launcher import JOB_MARKER

    r = preempted_run
    log = _job_log(r["log_folder"], r["job_id"])
    lines = [l for l in log.splitlines() if l.startswith(f"{JOB_MARKER} {r['job_id']} ")]
    assert len(lines) == 2, lines  # the first run and the requeued one
    for line in lines:
        assert "patches active: patch_dataset_catalog_for_explicit_paths" in line, line
        for names in swav_vissl_plugin.REGISTERED.values():
            for name in names:
                assert name in line, (name, line)
    # the job ran the same installed plugin as the submitting command, not the
    # source tree in its working directory (the repository root)
    assert "WARNING: the job imported" not in log
    job_file = re.search(r"plugin \S+ from (\S+),", lines[0]).group(1)
    if Path(swav_vissl_plugin.__file__).resolve().parent != REPO / "swav_vissl_plugin":
        assert Path(job_file).resolve().parent != REPO / "swav_vissl_plugin", job_file
    # unpickling the job imports the plugin before any VISSL module: the pickle
    # submitted, and the one SlurmJob.checkpoint wrote for the requeued run
    for pkl in (r["submitted_pickle"], r["log_folder"] / f"{r['job_id']}_submitted.pkl"):
        assert _first_project_module(pkl).startswith("swav_vissl_plugin."), _modules_in_load_order(pkl)


def test_preempted_job_requeued_and_resumed_from_last_checkpoint(preempted_run):
    r = preempted_run
    assert not r["finished_early"], "the job finished before it could be preempted: lengthen it"
    log = _job_log(r["log_folder"], r["job_id"])
    assert "Caught signal SIGUSR2" in log
    assert "SlurmJob.checkpoint" in log  # our checkpoint() ran in the job
    assert f"Requeued job {r['job_id']}" in log
    assert r["cluster"].job_field(r["job_id"], "Restarts") == "1"
    # the second run found VISSL's checkpoint of an unfinished epoch and loaded it
    second = log.split("SlurmJob.checkpoint", 1)[1]
    m = re.search(r"Resume from file: (\S+)", second)
    assert m, second[-3000:]
    resumed = Path(m.group(1))
    assert resumed.parent == r["run_dir"] and re.fullmatch(r"model_phase\d+\.torch", resumed.name), resumed
    assert int(resumed.name[len("model_phase") : -len(".torch")]) < EPOCHS - 1
    assert "Loaded loss state from checkpoint" in second
    # the pickle submitit requeued is SlurmJob.checkpoint's, with auto-resume on
    with open(r["log_folder"] / f"{r['job_id']}_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    assert type(delayed.function).__name__ == "SlurmJob"
    assert delayed.function.config.CHECKPOINT.AUTO_RESUME is True


def test_no_gpu_request_on_cpu_and_settable_resources(preempted_run):
    r = preempted_run
    script = (r["log_folder"] / f"{r['job_id']}_submission.sh").read_text()
    for flag in (
        "--job-name=swav-tiny",
        "--partition=debug",
        "--time=20",
        "--mem=1GB",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--signal=USR2@90",
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "gpu" not in script and "gres" not in script, script
    assert " -P -u -m submitit.core._submit" in script  # the venv's python, cwd not on sys.path


def test_vissl_own_job_class_fails_without_the_plugin(cluster, small_folder, tmp_path_factory):
    """Negative control: the same row submitted with VISSL's job class, which does
    not import the plugin in the job, must fail the checks the tests above make."""
    from vissl.utils.distributed_launcher import _ResumableSlurmJob

    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.launcher import JOB_MARKER, make_executor, set_run_directory

    run_dir = tmp_path_factory.mktemp("vissl_job") / "run"
    overrides = _overrides(small_folder, run_dir, "vissl-own") + ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]
    _, config = compose(overrides, dump_config=False)
    set_run_directory(config)
    job = make_executor(config).submit(_ResumableSlurmJob("train", config))
    state = cluster.wait_finished(job.job_id, JOB_TIMEOUT_S)
    log_folder = Path(config.SLURM.LOG_FOLDER)
    log = _job_log(log_folder, job.job_id)
    assert state == "FAILED", (state, log[-3000:])
    outcome, detail = _result(log_folder, job.job_id)
    # it fails on the first plugin component VISSL looks up (its registries raise
    # KeyError or assert "Unknown ...")
    assert outcome == "error" and re.search(r"swav_plugin|Unknown|KeyError", detail.splitlines()[-1]), detail[-3000:]
    assert not list(run_dir.glob("*.torch"))
    assert JOB_MARKER not in log
    assert _first_project_module(log_folder / f"{job.job_id}_submitted.pkl").startswith("vissl.")


# --------------------------------------------------------------------------
# the sbatch script of the documented GPU layouts (no cluster needed)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nodes, gpus, expected",
    [(1, 8, {"--nodes=1", "--gpus-per-node=8", "--cpus-per-task=80"}), (8, 8, {"--nodes=8", "--gpus-per-node=8", "--cpus-per-task=80"})],
    ids=["1_node_x_8_gpus", "8_nodes_x_8_gpus"],
)
def test_documented_gpu_layouts_make_this_sbatch_script(tmp_path, nodes, gpus, expected):
    """docs/slurm.md's examples: every settable key reaches submitit's sbatch script."""
    from submitit.slurm.slurm import _make_sbatch_string

    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.launcher import set_run_directory, slurm_parameters

    _, config = compose(
        [
            "config=swav_plugin/pretrain/swav_base",
            f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
            f"config.DISTRIBUTED.NUM_NODES={nodes}",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={gpus}",
            "config.SLURM.USE_SLURM=true",
            "config.SLURM.NAME=swav_row",
            "config.SLURM.PARTITION=gpu_part",
            "config.SLURM.CONSTRAINT=volta32gb",
            "config.SLURM.TIME_HOURS=72",
            "config.SLURM.TIME_MINUTES=30",
            "config.SLURM.MEM_GB=480",
            "config.SLURM.NUM_CPU_PER_PROC=10",
            "config.SLURM.COMMENT=swav",
            "+config.SLURM.ADDITIONAL_PARAMETERS.account=my_account",
        ],
        dump_config=False,
    )
    assert set_run_directory(config) == str(tmp_path / "run")
    assert config.SLURM.LOG_FOLDER == str(tmp_path / "run" / "slurm")
    script = _make_sbatch_string(command="python -u -m submitit.core._submit x", folder=config.SLURM.LOG_FOLDER, **slurm_parameters(config))
    flags = {line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")}
    assert expected | {
        "--job-name=swav_row",
        "--partition=gpu_part",
        "--constraint=volta32gb",
        "--time=4350",
        "--mem=480GB",
        "--ntasks-per-node=1",
        "--comment=swav",
        "--account=my_account",
        f"--output={tmp_path / 'run' / 'slurm'}/%j_0_log.out",
    } <= flags, sorted(flags)


def test_cpu_rows_ask_for_no_gpu_and_log_folder_is_kept_when_set(tmp_path):
    from swav_vissl_plugin.config import compose
    from swav_vissl_plugin.launcher import set_run_directory, slurm_parameters

    _, config = compose(
        [
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
            f"config.SLURM.LOG_FOLDER={tmp_path / 'elsewhere'}",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            "config.SLURM.NUM_CPU_PER_PROC=1",
        ],
        dump_config=False,
    )
    set_run_directory(config)
    assert config.SLURM.LOG_FOLDER == str(tmp_path / "elsewhere")
    params = slurm_parameters(config)
    assert "gpus_per_node" not in params and "gres" not in str(params), params
    assert params["cpus_per_task"] == 2 and params["nodes"] == 1 and "partition" not in params
