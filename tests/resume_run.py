"""One training run through VISSL's launcher with the plugin's hooks plus a
trajectory probe, for the resume tests (``tests/test_resume.py``).

    python tests/resume_run.py PROBE_DIR config=... config.KEY=value ...

The command line is the same for an uninterrupted run, a run that gets
killed and its rerun. Two environment variables drive the test:

* ``SWAV_TEST_RUN``: a label written into every probe record;
* ``SWAV_TEST_KILL=<iteration>:<event>``: when rank 0 reaches hook ``event``
  (``on_forward``, ``on_backward``, ``on_update``, ``on_step``) of training
  iteration ``<iteration>`` (0-based, ``task.iteration`` before the update),
  it sends SIGKILL to its whole process group: the launcher, every rank,
  the forkserver and the data-loader workers die at once, as under
  ``kill -9 -<pgid>``;
* ``SWAV_TEST_POISON=<iteration>:<rank>``: after the update of that
  iteration, that rank's prototypes become NaN (a model gone non-finite on
  one rank only);
* ``SWAV_TEST_DROP_HOOKS=<class name>,...``: hooks of the plugin's generator
  left out (e.g. ``NonFiniteLossHook``, which would stop the run).

Per rank, ``PROBE_DIR/probe_rank<r>.jsonl`` gets one line per finished
iteration (written and flushed at ``on_step``, after the checkpoint hook):
the loss and learning rate as exact hex floats, the dataset indices of the
batch, and SHA-256 digests of the prototypes, of the loss state (queue or
memory bank), of the model and of the random streams; plus one ``start`` line
per run with the iteration it starts from.
"""

import hashlib
import json
import os
import signal
import sys

import torch
from classy_vision.hooks.classy_hook import ClassyHook


def _digest_tensors(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(str(obj.dtype).encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest_tensors(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _digest_tensors(x, h)
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _digest_tensors(obj, h)
    return h.hexdigest()[:16]


class TrajectoryProbe(ClassyHook):
    on_loss_and_meter = ClassyHook._noop
    on_phase_start = ClassyHook._noop
    on_phase_end = ClassyHook._noop
    on_end = ClassyHook._noop

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder
        self.run = os.environ.get("SWAV_TEST_RUN", "")
        kill = os.environ.get("SWAV_TEST_KILL")
        self.kill = None
        if kill:
            iteration, event = kill.split(":")
            self.kill = (int(iteration), event)
        self.current = None
        poison = os.environ.get("SWAV_TEST_POISON")
        self.poison = tuple(int(x) for x in poison.split(":")) if poison else None

    def _rank(self) -> int:
        return int(os.environ.get("RANK", 0))

    def _write(self, rec) -> None:
        rec["run"] = self.run
        with open(os.path.join(self.folder, f"probe_rank{self._rank()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _maybe_kill(self, task, event: str) -> None:
        if self.kill and self._rank() == 0 and task.train and (int(task.iteration), event) == self.kill:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_start(self, task) -> None:
        ck = task.checkpoint
        self._write(
            {
                "start": True,
                "iteration": int(task.iteration),
                "resumed_from": None if ck is None else int(ck["iteration"]),
                "mode": None if ck is None else (ck.get("swav_plugin") or {}).get("mode"),
            }
        )

    def on_forward(self, task) -> None:
        if task.train:
            self.current = {
                "iteration": int(task.iteration),
                "epoch": int(task.train_phase_idx),
                "indices": task.last_batch.sample["data_idx"][0][: task.last_batch.sample["input"][0].shape[0]].tolist(),
            }
        self._maybe_kill(task, "on_forward")

    def on_backward(self, task) -> None:
        self._maybe_kill(task, "on_backward")

    def on_update(self, task) -> None:
        if not task.train:
            return
        head = task.base_model.heads[0]
        layers = head.prototype_layers() if hasattr(head, "prototype_layers") else []
        self.current.update(
            {
                "loss": float(task.last_batch.loss).hex(),
                "lr": float(task.optimizer.options_view.lr).hex(),
                "prototypes": digest([layer.weight for layer in layers]),
                "model": digest(task.base_model.state_dict()),
                "loss_state": digest(task.base_loss.state_dict()),
            }
        )
        self._maybe_kill(task, "on_update")
        if self.poison == (int(task.iteration), self._rank()):
            with torch.no_grad():
                for layer in layers:
                    layer.weight.fill_(float("nan"))

    def on_step(self, task) -> None:
        if not task.train or self.current is None:
            return
        from swav_vissl_plugin import rng_state

        self.current["rng"] = rng_state.digest()
        self.current["local_iteration_num"] = int(task.local_iteration_num)
        self.current["phase_losses"] = len(task.losses)
        self._write(self.current)
        self.current = None
        # on_step of iteration i runs after task.iteration became i + 1
        if self.kill and self._rank() == 0 and self.kill == (int(task.iteration) - 1, "on_step"):
            os.killpg(os.getpgid(0), signal.SIGKILL)


def probe_hook_generator(cfg):
    from swav_vissl_plugin.hooks import swav_plugin_hook_generator

    drop = set(filter(None, os.environ.get("SWAV_TEST_DROP_HOOKS", "").split(",")))
    hooks = [h for h in swav_plugin_hook_generator(cfg) if type(h).__name__ not in drop]
    return hooks + [TrajectoryProbe(os.environ["SWAV_TEST_PROBE_DIR"])]


def main(argv) -> int:
    from vissl.utils.distributed_launcher import launch_distributed

    import swav_vissl_plugin  # noqa: F401
    from swav_vissl_plugin.config import compose

    probe_dir, overrides = argv[0], argv[1:]
    os.makedirs(probe_dir, exist_ok=True)
    os.environ["SWAV_TEST_PROBE_DIR"] = os.path.abspath(probe_dir)
    _, config = compose(overrides)
    launch_distributed(config, node_id=0, engine_name="train", hook_generator=probe_hook_generator)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
