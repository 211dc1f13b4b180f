"""Training monitors: SwAV's own signals, cluster sizes, collapse warning.

Plain functions (no VISSL needed), each tested on hand-made matrices:

* :func:`code_entropy`: mean over samples of ``-sum_k q_k log q_k`` (nats,
  ``0 log 0 = 0``) of a ``(N, K)`` code matrix; ``log K`` for uniform codes,
  0 for one-hot codes.
* :func:`argmax_histogram` / :func:`prototype_utilisation`: how many samples
  have each prototype as their highest score / how many prototypes are the
  highest score of at least one sample.
* :func:`cluster_size_stats`: min, median, max cluster size and the number of
  empty clusters of a label vector (negative labels = unassigned, ignored).
* :class:`CollapseDetector`: counts consecutive iterations in which the
  batch uses too few prototypes or the loss sits at ``ln K``; fires once per
  streak of ``PATIENCE_ITERS``.

ClassyHooks (added by :func:`monitoring_hooks`, which
:func:`swav_vissl_plugin.hooks.plugin_hooks` calls):

* :class:`PrototypeMonitorHook` (any run whose first head is
  ``swav_plugin_head``): every iteration, the histogram of prototype argmaxes
  of the batch's ``crops_for_assign`` views (all ranks, one ``all_reduce``)
  and the loss's code entropy; on VISSL's TensorBoard logging iterations
  (``iteration % LOG_FREQUENCY == 0``, or ``<= 100`` and ``% 5 == 0``, the
  rule of ``SSLTensorboardHook``, same step numbering: ``task.iteration``
  before the update), on the primary rank, it writes::

      SwAV/code_entropy/head{h}             mean code entropy (nats), all ranks
      SwAV/code_entropy_fraction/head{h}    the same / ln K_h
      SwAV/prototype_utilisation/head{h}    prototypes that are the argmax of >= 1 view
      SwAV/prototype_utilisation_fraction/head{h}   the same / K_h
      SwAV/queue_in_use                     1 while the queue's scores enter Sinkhorn
      SwAV/queue_filled                     rows of the queue filled (per rank)
      SwAV/prototypes_frozen                1 while iteration < freeze_prototypes_niters
      SwAV/collapse_warning                 1 from the warning until the streak ends
      Speed/images_per_sec                  global batch x iterations / wall time,
                                            over the last logging interval (all ranks)

  (``code_entropy`` and ``queue_*`` only when the loss reports them in its
  ``last_stats``, as ``swav_plugin_loss`` does.) With ``swav_plugin_loss``
  it also runs the :class:`CollapseDetector` and logs the warning, with the
  likely causes, on the primary rank.
* :class:`ClusterStatsHook` (DeepCluster-v2 / SeLa-v2): at the first
  training iteration of every epoch, reads the loss's label table and
  writes, step = epoch::

      Clusters/head{h}/size_min, size_median, size_max, empty
      Clusters/head{h}/empty_epochs      epochs in a row the longest-empty
                                         cluster has been empty (0: none is)

  and logs the same as one line per head (:data:`CLUSTERS_MARK`, read back
  by :func:`parse_cluster_log`).

  The loss must expose ``labels``: a ``(n_heads, N)`` (or ``(N,)``) integer
  tensor with the cluster of each dataset index for this epoch, negative
  for unassigned indices; and, optionally, ``nmb_prototypes``: the number
  of clusters of each head (otherwise ``max label + 1``, which cannot count
  empty clusters above it). Without a ``labels`` attribute (or while it is
  ``None``) the hook does nothing.

TensorBoard: the scalars go to the ``SummaryWriter`` of VISSL's
``SSLTensorboardHook`` (``HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD: true``),
found among ``task.hooks``; without it nothing is written to TensorBoard
(the collapse warning and the kNN monitor's ``metrics.json`` still work).

Config, ``config.SWAV_PLUGIN.MONITOR`` (all optional; defaults in
:data:`MONITOR_DEFAULTS` and :data:`COLLAPSE_DEFAULTS`)::

    ENABLED: true                       # the two hooks above
    COLLAPSE:
      ENABLED: true
      MIN_UTILISATION_FRACTION: 0.1     # low: used < fraction x min(K, views in the batch)
      PATIENCE_ITERS: 200               # consecutive suspect iterations before the warning
      LOSS_REL_TOLERANCE: 0.005         # at ln K: |loss - ln K| <= tolerance x ln K
      START_ITER: null                  # first checked iteration; null: freeze_prototypes_niters
      RECIPE_LR_PER_256: 0.3            # the recipe's LR per 256 images ("LR too high" is 2x that)
    KNN: {...}                          # see swav_vissl_plugin.knn

A batch of ``n`` views can use at most ``min(K, n)`` prototypes, hence the
utilisation threshold's ``min``. A healthy run can sit near ``ln K`` for a
while right after the freeze: the CPU quickstart (K = 100) stays within 0.5 %
of ``ln K`` for about 50 iterations after its 31 frozen ones, hence the
patience of 200.

Reading the signals: when SwAV collapses, every image gets the same
embedding, so every row of the batch has the same argmax (utilisation -> 1)
and Sinkhorn, forced to spread the batch over all prototypes, returns
uniform codes (code entropy -> ``ln K``, ``code_entropy_fraction`` -> 1)
while the loss sits at ``ln K``. Healthy training has sharp codes (entropy
well below ``ln K``) and many prototypes in use.
"""

import logging
import math
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from classy_vision.hooks.classy_hook import ClassyHook
from torch import Tensor

from swav_vissl_plugin.hooks import NoopHook
from swav_vissl_plugin.knn import (
    KnnMonitorHook,
    _is_primary,
    find_tensorboard_writer,
    knn_settings,
    section,
)

__all__ = [
    "MONITOR_DEFAULTS",
    "COLLAPSE_DEFAULTS",
    "COLLAPSE_MARK",
    "LIKELY_CAUSES",
    "code_entropy",
    "argmax_histogram",
    "prototype_utilisation",
    "cluster_sizes",
    "cluster_size_stats",
    "EmptyClusterTracker",
    "CLUSTERS_MARK",
    "parse_cluster_log",
    "CollapseDetector",
    "collapse_message",
    "likely_collapse_causes",
    "PrototypeMonitorHook",
    "ClusterStatsHook",
    "monitoring_hooks",
]

MONITOR_DEFAULTS: Dict[str, Any] = {"ENABLED": True, "COLLAPSE": {}, "KNN": {}}
#: the release's learning rate per 256 images (4.8 at 4096; docs/recipe.md)
RELEASE_LR_PER_256 = 0.3
COLLAPSE_DEFAULTS: Dict[str, Any] = {
    "ENABLED": True,
    "MIN_UTILISATION_FRACTION": 0.1,
    "PATIENCE_ITERS": 200,
    "LOSS_REL_TOLERANCE": 0.005,
    "START_ITER": None,
    "RECIPE_LR_PER_256": RELEASE_LR_PER_256,
}
SWAV_LOSS = "swav_plugin_loss"
#: how the collapse warning starts, and the line before its list of causes
#: (one cause per following line, each starting with "  - ")
COLLAPSE_MARK = "SwAV looks collapsed:"
LIKELY_CAUSES = "Likely causes:"
#: how each per-epoch cluster line of :class:`ClusterStatsHook` starts in the
#: log (:func:`parse_cluster_log` reads them back)
CLUSTERS_MARK = "swav_vissl_plugin clusters:"
PROTOTYPE_HEAD = "swav_plugin_head"


# ------------------------------------------------------------------- metrics
@torch.no_grad()
def code_entropy(codes: Tensor) -> Tensor:
    """Mean over the rows of ``codes`` (N, K) of ``-sum_k q_k log q_k`` in
    nats, with ``0 log 0 = 0``. Rows are used as given (they should sum to 1)."""
    q = codes.float()
    return -(q * q.clamp(min=torch.finfo(q.dtype).tiny).log()).sum(dim=1).mean()


@torch.no_grad()
def argmax_histogram(scores: Tensor, num_prototypes: Optional[int] = None) -> Tensor:
    """``(K,)`` int64: for each prototype (column of ``scores`` (N, K)), the
    number of rows whose highest score it is (ties: the lowest index)."""
    k = scores.shape[1] if num_prototypes is None else int(num_prototypes)
    return torch.bincount(scores.argmax(dim=1), minlength=k)


def prototype_utilisation(scores: Tensor) -> int:
    """Number of prototypes that are the argmax of at least one row of
    ``scores`` (N, K)."""
    return int((argmax_histogram(scores) > 0).sum())


def cluster_sizes(labels: Tensor, num_clusters: Optional[int] = None) -> Tensor:
    """``(num_clusters,)`` float64 sizes of the clusters ``0..num_clusters-1``
    in ``labels`` (any shape, integers; negative = unassigned, not
    counted). ``num_clusters`` defaults to ``max(labels) + 1``."""
    flat = labels.reshape(-1).long()
    flat = flat[flat >= 0].cpu()
    if num_clusters is None:
        num_clusters = int(flat.max()) + 1 if flat.numel() else 0
    if num_clusters < 1:
        raise ValueError("no clusters: give num_clusters or at least one non-negative label")
    if flat.numel() and int(flat.max()) >= num_clusters:
        raise ValueError(f"label {int(flat.max())} >= num_clusters={num_clusters}")
    return torch.bincount(flat, minlength=num_clusters).double()


def cluster_size_stats(labels: Tensor, num_clusters: Optional[int] = None) -> Dict[str, float]:
    """Sizes of the clusters of ``labels`` (as :func:`cluster_sizes`):
    ``min``, ``median`` (the mean of the two middle sizes for an even
    count), ``max``, ``empty`` (clusters of size 0) and ``assigned``
    (labels >= 0)."""
    sizes = cluster_sizes(labels, num_clusters)
    k = int(sizes.numel())
    ordered = sizes.sort().values
    mid = k // 2
    median = float(ordered[mid]) if k % 2 else float((ordered[mid - 1] + ordered[mid]) / 2)
    return {
        "min": float(ordered[0]),
        "median": median,
        "max": float(ordered[-1]),
        "empty": int((sizes == 0).sum()),
        "assigned": int(sizes.sum()),
    }


class EmptyClusterTracker:
    """How many epochs in a row each cluster has been empty.

    :meth:`update` takes one epoch's cluster sizes per head (as
    :func:`cluster_sizes`) and returns, per head, the longest current run
    (``empty_epochs``: epochs in a row that some cluster has been empty, 0
    when none is) and the longest run so far (``empty_epochs_max``). A
    cluster empty in one epoch's labels that is used again in the next is a
    run of 1; DeepCluster-v2's k-means keeps an empty cluster's centroid,
    so a cluster can stay empty for good, which the runs show.
    """

    def __init__(self) -> None:
        self._runs: List[Tensor] = []
        self._max: List[int] = []

    def update(self, sizes_per_head: Sequence[Tensor]) -> List[Dict[str, int]]:
        if len(self._runs) != len(sizes_per_head) or any(
            r.numel() != s.numel() for r, s in zip(self._runs, sizes_per_head)
        ):
            self._runs = [torch.zeros(s.numel(), dtype=torch.long) for s in sizes_per_head]
            self._max = [0] * len(sizes_per_head)
        out = []
        for h, sizes in enumerate(sizes_per_head):
            run = torch.where(sizes.reshape(-1).cpu() == 0, self._runs[h] + 1, torch.zeros_like(self._runs[h]))
            self._runs[h] = run
            longest = int(run.max()) if run.numel() else 0
            self._max[h] = max(self._max[h], longest)
            out.append({"empty_epochs": longest, "empty_epochs_max": self._max[h]})
        return out


def parse_cluster_log(text: str) -> List[Dict[str, Any]]:
    """The per-epoch cluster lines of a run's ``log.txt`` (as
    :class:`ClusterStatsHook` writes them), one dict per line: ``epoch``,
    ``head``, ``min``, ``median``, ``max``, ``empty``, ``empty_epochs``
    (None for lines without it)."""
    pattern = re.compile(
        re.escape(CLUSTERS_MARK) + r" epoch (\d+) head (\d+): size min (\S+) median (\S+) max (\S+), "
        r"(\d+) empty(?:, longest for (\d+) epochs in a row)?"
    )
    rows = []
    for m in pattern.finditer(text):
        rows.append({
            "epoch": int(m.group(1)), "head": int(m.group(2)), "min": float(m.group(3)),
            "median": float(m.group(4)), "max": float(m.group(5)), "empty": int(m.group(6)),
            "empty_epochs": None if m.group(7) is None else int(m.group(7)),
        })
    return rows


# ------------------------------------------------------------------ collapse
class CollapseDetector:
    """Warn when training looks collapsed for ``patience_iters`` iterations.

    An iteration is *suspect* when, for some head ``h``, fewer than
    ``min_utilisation_fraction x min(K_h, views)`` prototypes are the argmax
    of at least one view of the batch, or when the loss is within
    ``loss_rel_tolerance x ln K`` of ``ln K`` (K: the mean of ``ln K_h`` over
    heads), the value of the swapped-prediction loss when codes and
    predictions are uniform. Iterations before ``start_iter`` are not checked.
    :meth:`update` returns True exactly once per run of ``patience_iters``
    consecutive suspect iterations (then :attr:`active` stays True until a
    healthy iteration ends the streak).
    """

    def __init__(
        self,
        num_prototypes: Sequence[int],
        min_utilisation_fraction: float = 0.1,
        patience_iters: int = 100,
        loss_rel_tolerance: float = 0.01,
        start_iter: int = 0,
    ):
        self.num_prototypes = [int(k) for k in num_prototypes]
        if not self.num_prototypes or min(self.num_prototypes) < 1:
            raise ValueError(f"num_prototypes must be positive, got {num_prototypes}")
        self.min_utilisation_fraction = float(min_utilisation_fraction)
        self.patience_iters = int(patience_iters)
        if self.patience_iters < 1:
            raise ValueError(f"patience_iters must be >= 1, got {patience_iters}")
        self.loss_rel_tolerance = float(loss_rel_tolerance)
        self.start_iter = int(start_iter)
        self.ln_k = sum(math.log(k) for k in self.num_prototypes) / len(self.num_prototypes)
        self.streak = 0
        self.active = False
        self.reasons: List[str] = []

    def suspect(self, utilisation: Sequence[int], views: int, loss: Optional[float]) -> List[str]:
        """Why this iteration looks collapsed (empty list: it does not)."""
        reasons = []
        for h, (used, k) in enumerate(zip(utilisation, self.num_prototypes)):
            floor = self.min_utilisation_fraction * min(k, int(views))
            if used < floor:
                reasons.append(
                    f"head {h}: {int(used)} of {k} prototypes are the argmax of any of the batch's "
                    f"{int(views)} views (< {self.min_utilisation_fraction:g} x {min(k, int(views))})"
                )
        if loss is not None and math.isfinite(loss) and abs(loss - self.ln_k) <= self.loss_rel_tolerance * self.ln_k:
            reasons.append(f"loss {loss:.4f} sits at ln K = {self.ln_k:.4f}")
        return reasons

    def update(self, iteration: int, utilisation: Sequence[int], views: int, loss: Optional[float]) -> bool:
        """Account for one iteration; True when the warning should be raised now."""
        if iteration < self.start_iter:
            return False
        reasons = self.suspect(utilisation, views, loss)
        if not reasons:
            self.streak, self.active, self.reasons = 0, False, []
            return False
        self.streak += 1
        self.reasons = reasons
        if self.streak == self.patience_iters:
            self.active = True
            return True
        return False


def collapse_message(patience: int, iteration: int, epoch: Any, reasons: Sequence[str],
                     causes: Sequence[str]) -> str:
    """The collapse warning's text: ``COLLAPSE_MARK``, the streak, the suspect
    signals, then ``LIKELY_CAUSES`` and one ``"  - "`` line per cause."""
    return (
        f"swav_vissl_plugin: {COLLAPSE_MARK} {patience} consecutive iterations up to "
        f"iteration {iteration} (epoch {epoch}) with " + "; ".join(reasons)
        + f". {LIKELY_CAUSES}\n  - " + "\n  - ".join(causes)
    )


def likely_collapse_causes(context: Mapping[str, Any]) -> List[str]:
    """The usual causes of a SwAV collapse, each marked ``[this run: ...]``
    when ``context`` shows it. Context keys (all optional):
    ``global_batch``, ``num_prototypes`` (K of the smallest head),
    ``queue_in_use``, ``queue_length``, ``epoch_queue_starts``,
    ``freeze_prototypes_niters``, ``lr`` (the highest LR trained with so
    far: the schedule may have decayed by the time a collapse is seen),
    ``recipe_lr_per_256`` (the LR the
    recipe was measured with, per 256 images; default the release's 0.3),
    ``normalize``.

    Batch: Sinkhorn spreads each step's samples (the batch, plus the queue
    once in use) evenly over the K prototypes; with fewer than K / 2 of
    them each prototype gets less than half a sample and the codes cannot
    be sharp (the release adds a queue at 256 images for K = 3000; the
    small-image recipe trains 64 images for K = 100 without one)."""
    c = dict(context)
    causes = []

    def add(text: str, flag: Optional[str]) -> None:
        causes.append(text + (f" [this run: {flag}]" if flag else ""))

    batch, k = c.get("global_batch"), c.get("num_prototypes")
    flag = None
    if batch is not None and not c.get("queue_in_use"):
        if k is not None and int(batch) < int(k) / 2:
            flag = f"global batch {int(batch)} for {int(k)} prototypes and no queue in use"
        elif k is None and int(batch) < 256:
            flag = f"global batch {int(batch)} and no queue in use"
    add("batch too small for the number of prototypes without a queue (fewer than K / 2 samples per "
        "Sinkhorn step: LOSS.swav_plugin_loss.queue_length, or fewer prototypes)", flag)

    flag = None
    if c.get("queue_in_use"):
        flag = f"queue in use since epoch {c.get('epoch_queue_starts')}"
    add("queue started too early (its stale embeddings dominate the codes before the features "
        "have moved; the recipe starts it at epoch 15 with batch 256: epoch_queue_starts)", flag)

    freeze = c.get("freeze_prototypes_niters")
    add("prototypes never frozen (the recipe freezes them for the first iterations: "
        "freeze_prototypes_niters)", "freeze_prototypes_niters = 0" if freeze is not None and int(freeze) == 0 else None)

    lr, flag = c.get("lr"), None
    per_256 = float(c.get("recipe_lr_per_256") or RELEASE_LR_PER_256)
    if lr is not None and batch:
        recipe = per_256 * int(batch) / 256.0
        if float(lr) > 2 * recipe:
            flag = (f"peak LR {float(lr):.4g} is {float(lr) / recipe:.1f}x the recipe's {per_256:g} per 256 "
                    f"images ({recipe:.4g})")
    add("learning rate too high (OPTIMIZER.param_schedulers.lr; the recipe's is "
        "SWAV_PLUGIN.MONITOR.COLLAPSE.RECIPE_LR_PER_256 per 256 images)", flag)

    add("features not normalised (MODEL.HEAD.PARAMS swav_plugin_head normalize: true; "
        "prototypes L2-normalised every step)", "head normalize = false" if c.get("normalize") is False else None)
    return causes


# ---------------------------------------------------------------- task access
def _loss(task):
    loss = getattr(task, "base_loss", None) or task.loss
    return getattr(loss, "module", loss)


def _head_output(output):
    while isinstance(output, (list, tuple)) and len(output) == 1 and isinstance(output[0], (list, tuple)):
        output = output[0]
    return output


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def vissl_logs_at(iteration: int, log_frequency: int) -> bool:
    """VISSL ``SSLTensorboardHook``'s rule for logging scalars at ``iteration``."""
    return iteration % int(log_frequency) == 0 or (iteration <= 100 and iteration % 5 == 0)


class _WriterMixin:
    def _writer_for(self, task):
        """VISSL's TensorBoard writer (primary rank), looked up once."""
        if getattr(self, "_writer", False) is False:
            self._writer = find_tensorboard_writer(task, getattr(self, "cfg", None), self._own_writers)
        return self._writer

    def _close_own(self):
        for w in self._own_writers:
            w.close()
        self._own_writers.clear()
        self._writer = False


# ------------------------------------------------------------------- hooks
class PrototypeMonitorHook(_WriterMixin, NoopHook):
    """SwAV's signals to TensorBoard and the collapse warning (see the
    module docstring for the tags and the rule)."""

    def __init__(self, cfg=None, collapse: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.cfg = cfg
        self.collapse_settings = {**COLLAPSE_DEFAULTS, **(collapse or {})}
        self.detector: Optional[CollapseDetector] = None
        self.freeze_prototypes_niters = 0
        self._writer = False
        self._own_writers: list = []
        self._t0 = None
        self._iters = 0
        # the highest LR trained with so far: a collapse caused by the LR's peak
        # (end of warmup) is seen later, when the schedule has already decayed
        self._peak_lr: Optional[float] = None
        #: the values of the last logging iteration (for tests and the text log).
        self.last: Dict[str, float] = {}
        #: warning messages raised so far.
        self.warnings: List[str] = []

    # -- setup
    def _freeze(self, task) -> int:
        for hook in getattr(task, "hooks", []) or []:
            if hook is not self and hasattr(hook, "freeze_prototypes_niters"):
                return int(hook.freeze_prototypes_niters or 0)
        cfg = task.config
        return int(cfg["LOSS"].get(cfg["LOSS"]["name"], {}).get("freeze_prototypes_niters") or 0)

    def on_start(self, task) -> None:
        head = task.base_model.heads[0]
        self.num_prototypes = [int(w.shape[0]) for w in head.prototype_parameters()]
        self.freeze_prototypes_niters = self._freeze(task)
        cfg = task.config
        self.global_batch = int(cfg["DATA"]["TRAIN"]["BATCHSIZE_PER_REPLICA"]) * _world()
        self.log_frequency = int(cfg["LOG_FREQUENCY"])
        s = self.collapse_settings
        if s["ENABLED"] and cfg["LOSS"]["name"] == SWAV_LOSS:
            start = s["START_ITER"]
            self.detector = CollapseDetector(
                self.num_prototypes,
                s["MIN_UTILISATION_FRACTION"],
                s["PATIENCE_ITERS"],
                s["LOSS_REL_TOLERANCE"],
                self.freeze_prototypes_niters if start is None else start,
            )
        self._normalize = getattr(head, "normalize", None)

    def on_phase_start(self, task) -> None:
        self._t0, self._iters = time.perf_counter(), 0

    # -- per iteration
    def _batch_stats(self, task):
        """Global argmax histograms per head and mean code entropies (or None)."""
        output = _head_output(task.last_batch.model_output)
        heads = list(output[1:])
        loss = _loss(task)
        rows = heads[0].shape[0]
        num_crops = int(getattr(loss, "num_crops", 0) or 0)
        assign = list(getattr(loss, "crops_for_assign", []) or [])
        if num_crops > 0 and rows % num_crops == 0 and assign:
            b = rows // num_crops
            idx = torch.cat([torch.arange(c * b, (c + 1) * b, device=heads[0].device) for c in assign])
        else:
            idx = torch.arange(rows, device=heads[0].device)
        with torch.no_grad():
            hist = [argmax_histogram(s.detach()[idx], k).to(torch.float64) for s, k in zip(heads, self.num_prototypes)]
            stats = getattr(loss, "last_stats", {}) or {}
            ent = stats.get("code_entropy")
            ent = None if not ent else [float(e) for e in ent]
            packed = torch.cat(hist + [torch.tensor([float(len(idx))] + (ent or []), dtype=torch.float64, device=idx.device)])
            world = _world()
            if world > 1:
                dist.all_reduce(packed)
            out, pos = [], 0
            for k in self.num_prototypes:
                out.append(packed[pos : pos + k])
                pos += k
            views = int(packed[pos])
            entropies = None if ent is None else [float(v) / world for v in packed[pos + 1 :]]
        return out, views, entropies, stats

    def on_update(self, task) -> None:
        if not task.train:
            return
        it = int(task.iteration)
        self._iters += 1
        try:
            lr = float(task.optimizer.options_view.lr)
            self._peak_lr = lr if self._peak_lr is None else max(self._peak_lr, lr)
        except Exception:  # noqa: BLE001 (the LR is only a hint for the warning)
            pass
        log_now = vissl_logs_at(it, self.log_frequency)
        detect = self.detector is not None and it >= self.detector.start_iter
        if not (log_now or detect):
            return
        hists, views, entropies, stats = self._batch_stats(task)
        used = [int((h > 0).sum()) for h in hists]
        loss_value = float(task.last_batch.loss) if getattr(task.last_batch, "loss", None) is not None else None
        primary = _is_primary()
        if detect and self.detector.update(it, used, views, loss_value) and primary:
            self._warn(task, it, used, views, loss_value, stats)
        if not log_now:
            return
        now = time.perf_counter()
        elapsed = now - self._t0 if self._t0 is not None else None
        values: Dict[str, float] = {}
        for h, (u, k) in enumerate(zip(used, self.num_prototypes)):
            values[f"SwAV/prototype_utilisation/head{h}"] = u
            values[f"SwAV/prototype_utilisation_fraction/head{h}"] = u / k
            if entropies is not None:
                values[f"SwAV/code_entropy/head{h}"] = entropies[h]
                values[f"SwAV/code_entropy_fraction/head{h}"] = entropies[h] / math.log(k) if k > 1 else 0.0
        if "queue_in_use" in stats:
            values["SwAV/queue_in_use"] = float(bool(stats["queue_in_use"]))
            values["SwAV/queue_filled"] = float(stats.get("queue_filled", 0))
        values["SwAV/prototypes_frozen"] = float(it < self.freeze_prototypes_niters)
        if self.detector is not None:
            values["SwAV/collapse_warning"] = float(self.detector.active)
        if elapsed and elapsed > 0:
            values["Speed/images_per_sec"] = self._iters * self.global_batch / elapsed
        self._t0, self._iters = now, 0
        self.last = values
        if not primary:
            return
        logging.info(
            "swav_vissl_plugin monitor: iteration %d: %s", it,
            ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in values.items()),
        )
        writer = self._writer_for(task)
        if writer is not None:
            for tag, v in values.items():
                writer.add_scalar(tag, v, global_step=it)

    def _warn(self, task, it, used, views, loss_value, stats) -> None:
        loss = _loss(task)
        context = {
            "global_batch": self.global_batch,
            "num_prototypes": min(self.num_prototypes),
            "recipe_lr_per_256": self.collapse_settings["RECIPE_LR_PER_256"],
            "queue_in_use": bool(stats.get("queue_in_use", False)),
            "queue_length": getattr(loss, "queue_length", None),
            "epoch_queue_starts": getattr(loss, "epoch_queue_starts", None),
            "freeze_prototypes_niters": self.freeze_prototypes_niters,
            "lr": self._peak_lr,
            "normalize": self._normalize,
        }
        d = self.detector
        msg = collapse_message(d.patience_iters, it, getattr(task, "train_phase_idx", "?"), d.reasons,
                               likely_collapse_causes(context))
        self.warnings.append(msg)
        logging.warning("%s", msg)

    def on_phase_end(self, task) -> None:
        if _is_primary() and self._writer not in (False, None):
            self._writer.flush()

    def on_end(self, task) -> None:
        self.on_phase_end(task)
        self._close_own()


class ClusterStatsHook(_WriterMixin, NoopHook):
    """Cluster sizes of the loss's ``labels`` table, once per training epoch
    (see the module docstring for the attribute it reads and the tags)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg
        self._writer = False
        self._own_writers: list = []
        self._pending = False
        #: epoch -> list of per-head stats, as logged.
        self.history: Dict[int, List[Dict[str, float]]] = {}
        self._empty = EmptyClusterTracker()

    def on_phase_start(self, task) -> None:
        self._pending = bool(task.train)

    def on_step(self, task) -> None:
        if not self._pending:
            return
        self._pending = False
        loss = _loss(task)
        labels = getattr(loss, "labels", None)
        if labels is None or not _is_primary():
            return
        table = labels if labels.dim() == 2 else labels.reshape(1, -1)
        ks = getattr(loss, "nmb_prototypes", None)
        epoch = int(task.train_phase_idx)
        per_head, sizes = [], []
        for h in range(table.shape[0]):
            k = int(ks[h]) if ks is not None and h < len(ks) else None
            sizes.append(cluster_sizes(table[h], k))
            per_head.append(cluster_size_stats(table[h], k))
        for st, runs in zip(per_head, self._empty.update(sizes)):
            st.update(runs)
        self.history[epoch] = per_head
        writer = self._writer_for(task)
        for h, st in enumerate(per_head):
            logging.info(
                "%s epoch %d head %d: size min %g median %g max %g, %d empty, longest for %d epochs in a row",
                CLUSTERS_MARK, epoch, h, st["min"], st["median"], st["max"], st["empty"], st["empty_epochs"],
            )
            if writer is not None:
                for name in ("min", "median", "max"):
                    writer.add_scalar(f"Clusters/head{h}/size_{name}", st[name], global_step=epoch)
                writer.add_scalar(f"Clusters/head{h}/empty", st["empty"], global_step=epoch)
                writer.add_scalar(f"Clusters/head{h}/empty_epochs", st["empty_epochs"], global_step=epoch)

    def on_end(self, task) -> None:
        if self._writer not in (False, None):
            self._writer.flush()
        self._close_own()


# ------------------------------------------------------------------- wiring
def monitor_settings(cfg) -> Dict[str, Any]:
    """``config.SWAV_PLUGIN.MONITOR`` with defaults: ``{"ENABLED", "COLLAPSE":
    {...}, "KNN": {...}}``, checked (errors name the key)."""
    top = section(cfg, "", MONITOR_DEFAULTS)
    collapse = section(cfg, "COLLAPSE", COLLAPSE_DEFAULTS)
    key = "config.SWAV_PLUGIN.MONITOR.COLLAPSE."
    if not 0 <= float(collapse["MIN_UTILISATION_FRACTION"]) <= 1:
        raise ValueError(f"{key}MIN_UTILISATION_FRACTION must be in [0, 1], got {collapse['MIN_UTILISATION_FRACTION']!r}")
    if not isinstance(collapse["PATIENCE_ITERS"], int) or collapse["PATIENCE_ITERS"] < 1:
        raise ValueError(f"{key}PATIENCE_ITERS must be a positive integer, got {collapse['PATIENCE_ITERS']!r}")
    if not float(collapse["LOSS_REL_TOLERANCE"]) >= 0:
        raise ValueError(f"{key}LOSS_REL_TOLERANCE must be >= 0, got {collapse['LOSS_REL_TOLERANCE']!r}")
    if collapse["START_ITER"] is not None and (not isinstance(collapse["START_ITER"], int) or collapse["START_ITER"] < 0):
        raise ValueError(f"{key}START_ITER must be an integer >= 0 or null, got {collapse['START_ITER']!r}")
    if isinstance(collapse["RECIPE_LR_PER_256"], bool) or not float(collapse["RECIPE_LR_PER_256"]) > 0:
        raise ValueError(f"{key}RECIPE_LR_PER_256 must be > 0, got {collapse['RECIPE_LR_PER_256']!r}")
    return {"ENABLED": bool(top["ENABLED"]), "COLLAPSE": collapse, "KNN": knn_settings(cfg)}


def _first_head(cfg) -> Optional[str]:
    try:
        return cfg["MODEL"]["HEAD"]["PARAMS"][0][0]
    except (KeyError, IndexError, TypeError):
        return None


def monitoring_hooks(cfg) -> List[ClassyHook]:
    """The monitoring hooks ``cfg`` asks for (see the module docstring)."""
    s = monitor_settings(cfg)
    hooks: List[ClassyHook] = []
    if s["ENABLED"]:
        if _first_head(cfg) == PROTOTYPE_HEAD:
            hooks.append(PrototypeMonitorHook(cfg, s["COLLAPSE"]))
        hooks.append(ClusterStatsHook(cfg))
    if s["KNN"]["ENABLED"]:
        hooks.append(KnnMonitorHook(s["KNN"], cfg))
    return hooks
