"""The plugin's entry point: VISSL's command line with the plugin inside.

``python tools/run_distributed_engines.py config=<path> config.KEY=value ...``
composes the config (:func:`swav_vissl_plugin.config.compose`), logs the
effective recipe, and hands over to VISSL's launcher with the plugin's hook
generator: local multi-process training (gloo on CPU, nccl on GPU) or, with
``config.SLURM.USE_SLURM=true``, a submitit job (:func:`submit_to_slurm`).

Spawned workers and Slurm jobs start fresh interpreters. A Slurm job
unpickles :class:`SlurmJob`, which lives in this package, so Python imports
``swav_vissl_plugin`` (registrations and compatibility patches) before it
unpickles the VISSL config or runs anything; the job checks and logs that.
"""

import logging
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence

import swav_vissl_plugin  # noqa: F401  (registration and patches, before VISSL runs)
from swav_vissl_plugin.config import compose, describe
from swav_vissl_plugin.hooks import swav_plugin_hook_generator

#: the submitit folder's name inside the run directory when SLURM.LOG_FOLDER is not set
SLURM_SUBDIR = "slurm"
#: the first line a Slurm job prints (to ``<LOG_FOLDER>/<job id>_0_log.out``)
JOB_MARKER = "swav_vissl_plugin Slurm job"


def launch(config, engine_name: str = "train", node_id: int = 0) -> None:
    """Run ``engine_name`` on this node with the plugin's hooks."""
    from vissl.utils.distributed_launcher import launch_distributed

    launch_distributed(
        cfg=config,
        node_id=node_id,
        engine_name=engine_name,
        hook_generator=swav_plugin_hook_generator,
    )


# --------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------
def plugin_report() -> Dict[str, Any]:
    """What the plugin set up in this process: file, registered names, active patches."""
    import importlib

    from classy_vision.dataset.transforms import TRANSFORM_REGISTRY
    from classy_vision.losses import LOSS_REGISTRY
    from classy_vision.optim import OPTIMIZER_REGISTRY
    from classy_vision.optim.param_scheduler import PARAM_SCHEDULER_REGISTRY
    from vissl.data.collators import COLLATOR_REGISTRY
    from vissl.models.heads import MODEL_HEADS_REGISTRY
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY
    from vissl.trainer.train_steps import TRAIN_STEP_REGISTRY

    from swav_vissl_plugin import compat

    registries = {
        "loss": LOSS_REGISTRY,
        "model_head": MODEL_HEADS_REGISTRY,
        "model_trunk": MODEL_TRUNKS_REGISTRY,
        "transform": TRANSFORM_REGISTRY,
        "collator": COLLATOR_REGISTRY,
        "optimizer": OPTIMIZER_REGISTRY,
        "param_scheduler": PARAM_SCHEDULER_REGISTRY,
        "train_step": TRAIN_STEP_REGISTRY,
    }
    registered, missing, unchecked = [], [], []
    for kind, names in swav_vissl_plugin.REGISTERED.items():
        for name in names:
            if kind not in registries:
                unchecked.append(name)
            else:
                (registered if name in registries[kind] else missing).append(name)
    # a patch is active when VISSL's attribute is no longer the original
    inactive = [
        f"{module}.{attr}"
        for (module, attr), original in compat.ORIGINALS.items()
        if getattr(importlib.import_module(module), attr) is original
    ]
    return {
        "file": swav_vissl_plugin.__file__,
        "version": swav_vissl_plugin.__version__,
        "registered": registered,
        "missing": missing,
        "unchecked": unchecked,
        "patches": list(compat.APPLIED),
        "inactive_patches": inactive,
    }


class SlurmJob:
    """The submitit job: imports the plugin, then runs VISSL's launcher on its node.

    VISSL's own job class (``_ResumableSlurmJob``) imports only VISSL in the
    job, so the plugin's names and patches would be missing there. One task
    per node: ``launch_distributed`` spawns ``NUM_PROC_PER_NODE`` ranks, node
    ``SLURM_PROCID`` of ``NUM_NODES``, rendezvous at the first node on
    ``SLURM.PORT_ID``.

    :meth:`checkpoint` is submitit's preemption/timeout hook (``USR2``, sent
    ``signal_delay_s`` before the end): it returns a ``DelayedSubmission`` of
    this job with ``CHECKPOINT.AUTO_RESUME`` on, submitit requeues the Slurm
    job, and VISSL resumes from the last checkpoint in ``CHECKPOINT.DIR``.
    A job requeued by Slurm itself (``scontrol requeue``, node failure) reruns
    the same pickle and resumes the same way.
    """

    def __init__(self, engine_name: str, config, submitted_plugin_file: Optional[str] = None):
        self.engine_name = engine_name
        self.config = config
        self.submitted_plugin_file = submitted_plugin_file or swav_vissl_plugin.__file__

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        report = plugin_report()
        print(
            f"{JOB_MARKER} {env.job_id} (node {env.global_rank} of {env.num_nodes}): "
            f"plugin {report['version']} from {report['file']}, "
            f"patches active: {', '.join(report['patches']) or 'none'}, "
            f"registered: {', '.join(report['registered'])}"
            + (f" (registry not checked: {', '.join(report['unchecked'])})" if report["unchecked"] else ""),
            flush=True,
        )
        if report["missing"] or report["inactive_patches"]:
            raise RuntimeError(
                "swav_vissl_plugin is not set up in this Slurm job: "
                f"unregistered {report['missing']}, patches undone {report['inactive_patches']}"
            )
        if os.path.realpath(report["file"]) != os.path.realpath(self.submitted_plugin_file):
            print(
                f"WARNING: the job imported swav_vissl_plugin from {report['file']}, "
                f"the submitting process from {self.submitted_plugin_file}",
                flush=True,
            )
        self.config.DISTRIBUTED.INIT_METHOD = "tcp"
        self.config.DISTRIBUTED.RUN_ID = f"{env.hostnames[0]}:{self.config.SLURM.PORT_ID}"
        launch(self.config, self.engine_name, node_id=env.global_rank)

    def checkpoint(self, *args, **kwargs):
        import submitit

        self.config.CHECKPOINT.AUTO_RESUME = True
        print(
            f"{JOB_MARKER}: SlurmJob.checkpoint: preempted or timed out; the requeued job "
            f"resumes from the last checkpoint in {self.config.CHECKPOINT.DIR}",
            flush=True,
        )
        return submitit.helpers.DelayedSubmission(
            SlurmJob(self.engine_name, self.config, self.submitted_plugin_file)
        )


def set_run_directory(config) -> str:
    """Make ``CHECKPOINT.DIR`` absolute and put submitit's folder inside it.

    ``SLURM.LOG_FOLDER`` left at VISSL's default (``.``) or empty becomes
    ``<CHECKPOINT.DIR>/slurm``; a relative one is taken from the current
    directory. Returns the run directory (``CHECKPOINT.DIR``).
    """
    run_dir = os.path.abspath(os.path.expanduser(str(config.CHECKPOINT.DIR)))
    config.CHECKPOINT.DIR = run_dir
    log_folder = str(config.SLURM.LOG_FOLDER or "").strip()
    if log_folder in ("", "."):
        log_folder = os.path.join(run_dir, SLURM_SUBDIR)
    config.SLURM.LOG_FOLDER = os.path.abspath(os.path.expanduser(log_folder))
    return run_dir


def slurm_parameters(config) -> Dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters from ``config.SLURM`` and ``config.DISTRIBUTED``.

    One task per node with ``NUM_CPU_PER_PROC x NUM_PROC_PER_NODE`` CPUs;
    ``NUM_PROC_PER_NODE`` GPUs per node only when ``MACHINE.DEVICE`` is gpu
    (a CPU-only cluster rejects any GPU request). Empty PARTITION, CONSTRAINT
    and COMMENT are left out (the cluster's defaults apply).
    ``SLURM.ADDITIONAL_PARAMETERS`` (any sbatch option, e.g. ``account``,
    ``qos``, ``signal``) is applied last and wins.
    """
    slurm, dist = config.SLURM, config.DISTRIBUTED
    params: Dict[str, Any] = dict(
        job_name=str(slurm.NAME),
        time=int(slurm.TIME_HOURS) * 60 + int(slurm.TIME_MINUTES),
        nodes=int(dist.NUM_NODES),
        ntasks_per_node=1,
        cpus_per_task=int(slurm.NUM_CPU_PER_PROC) * int(dist.NUM_PROC_PER_NODE),
    )
    if slurm.MEM_GB is not None:
        mem = float(slurm.MEM_GB)
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for key, name in (("partition", "PARTITION"), ("constraint", "CONSTRAINT"), ("comment", "COMMENT")):
        if slurm.get(name):
            params[key] = str(slurm[name])
    if config.MACHINE.DEVICE == "gpu":
        params["gpus_per_node"] = int(dist.NUM_PROC_PER_NODE)
    additional = dict(slurm.ADDITIONAL_PARAMETERS or {})
    if additional:
        params["additional_parameters"] = additional
    return params


def make_executor(config):
    """A submitit ``SlurmExecutor`` writing to ``SLURM.LOG_FOLDER``.

    Not ``AutoExecutor``: without Slurm it would silently run locally. The job
    runs this very interpreter (the venv's python) with ``-P`` (Python >= 3.11)
    so that its working directory, e.g. a source checkout, cannot shadow the
    installed plugin; spawned ranks inherit the flag.
    """
    import submitit

    os.makedirs(config.SLURM.LOG_FOLDER, exist_ok=True)
    python = shlex.quote(sys.executable) + (" -P" if sys.version_info >= (3, 11) else "")
    executor = submitit.SlurmExecutor(folder=config.SLURM.LOG_FOLDER, python=python)
    executor.update_parameters(**slurm_parameters(config))
    return executor


def submit_to_slurm(config, engine_name: str = "train"):
    """Submit ``engine_name`` with ``config`` as one Slurm job; returns the submitit job.

    Logs and checkpoints go to one run directory: VISSL's checkpoints,
    ``log.txt`` and ``train_config.yaml`` in ``CHECKPOINT.DIR``, submitit's
    sbatch script, pickles and per-node stdout/stderr in ``SLURM.LOG_FOLDER``
    (``<CHECKPOINT.DIR>/slurm`` by default).
    """
    from swav_vissl_plugin.config import _dump

    run_dir = set_run_directory(config)
    _dump(config)  # the submitted config, with its absolute paths, in the run directory
    executor = make_executor(config)
    job = executor.submit(SlurmJob(engine_name, config))
    print(f"SUBMITTED: {job.job_id} (run directory: {run_dir}, Slurm logs: {config.SLURM.LOG_FOLDER})", flush=True)
    return job


def main(argv: Optional[Sequence[str]] = None) -> int:
    overrides: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not any(o.startswith("config=") for o in overrides):
        print("usage: run_distributed_engines.py config=<path> [config.KEY=value ...]", file=sys.stderr)
        return 2
    args, config = compose(overrides)
    logging.getLogger().setLevel(logging.INFO)
    logging.info("swav_vissl_plugin: %s", describe(config))
    if config.SLURM.USE_SLURM:
        submit_to_slurm(config, args.engine_name)
    else:
        launch(config, args.engine_name, node_id=args.node_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
