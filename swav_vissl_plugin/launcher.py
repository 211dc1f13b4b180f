"""The plugin's entry point: VISSL's command line with the plugin inside.

``python tools/run_distributed_engines.py config=<path> config.KEY=value ...``
composes the config (:func:`swav_vissl_plugin.config.compose`), logs the
effective recipe, and hands over to VISSL's launcher with the plugin's hook
generator: local multi-process training (gloo on CPU, nccl on GPU) or, with
``config.SLURM.USE_SLURM=true``, a submitit job.

Spawned workers and Slurm jobs start fresh interpreters: the job callable
below imports :mod:`swav_vissl_plugin` before anything else runs, so the
registrations and compatibility patches exist there too.
"""

import logging
import sys
from typing import List, Optional, Sequence

import swav_vissl_plugin  # noqa: F401  (registration and patches, before VISSL runs)
from swav_vissl_plugin.config import compose, describe
from swav_vissl_plugin.hooks import swav_plugin_hook_generator


def launch(config, engine_name: str = "train", node_id: int = 0) -> None:
    """Run ``engine_name`` on this node with the plugin's hooks."""
    from vissl.utils.distributed_launcher import launch_distributed

    launch_distributed(
        cfg=config,
        node_id=node_id,
        engine_name=engine_name,
        hook_generator=swav_plugin_hook_generator,
    )


class SlurmJob:
    """A submitit job that imports the plugin, then runs VISSL's launcher.

    VISSL's own job class re-imports only VISSL in the job; this one imports
    the plugin first. ``checkpoint`` makes submitit requeue the same job on
    preemption; VISSL's auto-resume then continues from the last checkpoint.
    """

    def __init__(self, engine_name: str, config):
        self.engine_name = engine_name
        self.config = config

    def __call__(self):
        import submitit

        import swav_vissl_plugin  # noqa: F401

        env = submitit.JobEnvironment()
        self.config.DISTRIBUTED.INIT_METHOD = "tcp"
        self.config.DISTRIBUTED.RUN_ID = f"{env.hostnames[0]}:{self.config.SLURM.PORT_ID}"
        launch(self.config, self.engine_name, node_id=env.global_rank)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmJob(self.engine_name, self.config))


def submit_to_slurm(config, engine_name: str = "train"):
    """Submit through submitit; no GPU request when ``MACHINE.DEVICE`` is cpu."""
    import submitit
    from vissl.utils.io import makedir

    slurm = config.SLURM
    makedir(slurm.LOG_FOLDER)
    executor = submitit.AutoExecutor(folder=slurm.LOG_FOLDER)
    params = dict(
        name=slurm.NAME,
        timeout_min=int(slurm.TIME_HOURS) * 60 + int(slurm.TIME_MINUTES),
        nodes=config.DISTRIBUTED.NUM_NODES,
        tasks_per_node=1,
        cpus_per_task=slurm.NUM_CPU_PER_PROC * config.DISTRIBUTED.NUM_PROC_PER_NODE,
        mem_gb=slurm.MEM_GB,
        slurm_additional_parameters=dict(slurm.ADDITIONAL_PARAMETERS or {}),
    )
    if slurm.PARTITION:
        params["slurm_partition"] = slurm.PARTITION
    if slurm.CONSTRAINT:
        params["slurm_constraint"] = slurm.CONSTRAINT
    if slurm.COMMENT:
        params["slurm_comment"] = slurm.COMMENT
    if config.MACHINE.DEVICE == "gpu":
        params["gpus_per_node"] = config.DISTRIBUTED.NUM_PROC_PER_NODE
    executor.update_parameters(**params)
    job = executor.submit(SlurmJob(engine_name, config))
    print(f"SUBMITTED: {job.job_id} (logs: {slurm.LOG_FOLDER})")
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
